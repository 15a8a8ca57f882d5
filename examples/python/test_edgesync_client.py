"""Tests of edgesync_client.py against the real agent (stdlib unittest).

    EDGESYNC_BIN=target/debug/edgesync python3 -m unittest discover -s examples/python -v

Each test class starts `edgesync run` with a config in a temporary directory whose broker is
unreachable (a closed port): the agent runs offline and queues reports, which is all the
socket needs. Waits poll with deadlines; nothing sleeps for a fixed time to wait for an event.
Without EDGESYNC_BIN the tests are skipped, unless EDGESYNC_REQUIRE_PYTHON=1.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from edgesync_client import Client, EdgesyncError, NotReachable, Watcher  # noqa: E402

BIN = os.environ.get("EDGESYNC_BIN", "")
DEADLINE = 20.0


def wait_until(what, cond, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Agent:
    """`edgesync run` in a temporary directory (short, under /tmp: the socket path)."""

    def __init__(self, extra=""):
        self.dir = tempfile.TemporaryDirectory(prefix="espy", dir="/tmp")
        d = self.dir.name
        self.socket = os.path.join(d, "s.sock")
        self.config = os.path.join(d, "edgesync.toml")
        open(os.path.join(d, "ca.pem"), "w").close()
        with open(self.config, "w") as f:
            f.write(
                f'[device]\nid = "py-1"\n[mqtt]\nurl = "mqtts://127.0.0.1:{closed_port()}"\n'
                f'ca = "ca.pem"\n[store]\npath = "store/s.redb"\nmax_bytes = "4MiB"\n'
                f'[local]\nsocket = "{self.socket}"\n{extra}'
            )
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESYNC_", "NOTIFY_"))}
        self.log = open(os.path.join(self.dir.name, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [BIN, "run", "--config", self.config],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
        )

        def ready():
            assert self.proc.poll() is None, f"edgesync run exited: {self.proc.returncode}"
            try:
                with Client(self.socket, timeout=2) as c:
                    return c.status()["ok"]
            except NotReachable:
                return False

        wait_until("the agent to answer", ready)

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=DEADLINE)
            self.proc = None
            self.log.close()

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.log.close()
        self.dir.cleanup()


def setUpModule():
    if not BIN:
        if os.environ.get("EDGESYNC_REQUIRE_PYTHON") == "1":
            raise RuntimeError("EDGESYNC_BIN must name the edgesync binary")
        raise unittest.SkipTest("EDGESYNC_BIN not set: the tests need the real agent")


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.agent = Agent()
        cls.agent.start()

    @classmethod
    def tearDownClass(cls):
        cls.agent.close()

    def test_report_get_status(self):
        with Client(self.agent.socket) as c:
            first, last = c.report({"py.temp": 21.5, "py.mode": "eco"})
            self.assertEqual(last, first + 1)
            self.assertEqual(c.get("reported", "py.temp"), 21.5)
            self.assertEqual(c.get("reported")["py.mode"], "eco")
            self.assertIsNone(c.get("reported", "py.none"))
            self.assertEqual(c.get("desired"), {})
            status = c.status()
            # Offline: the changes wait in the queue.
            self.assertGreaterEqual(status["queue"]["depth"], 2)
            self.assertNotEqual(status["connection"]["state"], "online")
            self.assertEqual(c.history("py.temp"), [])
            c.report([{"key": "py.ts", "value": [1, 2], "ts": 1764150000000}])
            self.assertEqual(c.get("reported", "py.ts"), [1, 2])

    def test_errors_keep_the_connection(self):
        with Client(self.agent.socket) as c:
            with self.assertRaises(EdgesyncError) as e:
                c.report({"bad key!": 1})
            self.assertEqual(e.exception.code, "invalid-change")
            with self.assertRaises(EdgesyncError) as e:
                c.request({"op": "frobnicate"})
            self.assertEqual(e.exception.code, "unknown-op")
            with self.assertRaises(EdgesyncError) as e:
                c.ack(12345)
            self.assertEqual(e.exception.code, "bad-request")
            self.assertTrue(c.status()["ok"])

    def test_not_reachable(self):
        with self.assertRaises(NotReachable):
            Client(os.path.join(self.agent.dir.name, "none.sock")).connect()

    def test_command_line(self):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edgesync_client.py")
        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, script, "--socket", self.agent.socket, *a],
            capture_output=True, text=True, timeout=DEADLINE,
        )
        out = run("report", "cli.n=7", "cli.s=hi")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(run("get", "reported", "cli.n").stdout.strip(), "7")
        self.assertEqual(run("get", "reported", "cli.s").stdout.strip(), '"hi"')
        self.assertEqual(run("report", "bad key=1").returncode, 4)
        self.assertEqual(run("get").returncode, 2)


class WatchTest(unittest.TestCase):
    def setUp(self):
        self.agent = Agent('[[desired.handler]]\nkeys = "led.*"\ntype = "watch"\n')
        self.agent.start()

    def tearDown(self):
        self.agent.close()

    def test_watch_answers_and_ack_of_no_event(self):
        with Client(self.agent.socket) as c:
            self.assertEqual(c.watch(["led.*"]), ["led.*"])
            self.assertIsNone(c.next_event(timeout=0.05))
            # Requests still work on a watching connection.
            self.assertTrue(c.status()["ok"])
            with self.assertRaises(EdgesyncError) as e:
                c.watch(["bad glob!"])
            self.assertEqual(e.exception.code, "bad-request")

    def test_watcher_watches_again_after_an_agent_restart(self):
        watches = []
        w = Watcher(self.agent.socket, ["led.*"], lambda k, v, n: True,
                    on_watch=lambda: watches.append(time.monotonic()))
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        try:
            wait_until("the first watch", lambda: len(watches) == 1)
            self.agent.stop()
            self.agent.start()
            wait_until("the watch after the restart", lambda: len(watches) == 2)
            # The agent knows the watcher again: its status still answers, the client lives.
            self.assertTrue(t.is_alive())
        finally:
            w.stop()
            t.join(timeout=DEADLINE)
        self.assertFalse(t.is_alive())


if __name__ == "__main__":
    unittest.main()
