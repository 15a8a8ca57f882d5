#!/usr/bin/env python3
"""A small client for the edgesync local socket (docs/PROTOCOL.md §6), Python 3 stdlib only.

    from edgesync_client import Client, Watcher

    with Client("/run/edgesync/edgesync.sock") as c:
        c.report({"temp": 21.5, "mode": "eco"})      # returns (first_seq, last_seq) once durable
        c.get("desired")                             # {"setpoint": 20, ...}
        c.get("reported", "temp")                    # 21.5, or None
        c.status()["queue"]["depth"]

    def apply(key, value, version):                  # True: applied; False or raise: failed
        print(key, value, version)
        return True

    Watcher("/run/edgesync/edgesync.sock", ["led.*"], apply).run()

Command line: edgesync_client.py [--socket PATH] report KEY=VALUE... | get desired|reported [KEY]
| status | watch GLOB...  (watch prints {"watching": [...]} after each (re)connection, then
each event as a JSON line, and acks it applied).

Reconnecting after an agent restart: a watch lasts as long as its connection. When the agent
stops (upgrade, restart, crash) the connection ends and the agent forgets the watch; Watcher
connects again with a growing pause (0.1 s to 5 s) and sends the same watch again. Events that
came while no program watched are answered "failed" to the cloud (no watcher), never queued
for later: the cloud sends a new version to try again. An event whose ack was not sent before
the connection ended is failed too, and never sent again (PROTOCOL §1.5, §6.6). A report whose
answer was lost with the connection is in doubt (§1.1): report it again.
"""

import json
import os
import socket
import sys
import time

DEFAULT_SOCKET = "/run/edgesync/edgesync.sock"
USAGE = (
    "usage: edgesync_client.py [--socket PATH] report KEY=VALUE... | get desired|reported [KEY]"
    " | status | watch GLOB...   (socket also from $EDGESYNC_SOCKET)"
)


class EdgesyncError(Exception):
    """An error answer: `code` is one of PROTOCOL §6.1 (bad-request, invalid-change, ...)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NotReachable(EdgesyncError):
    """No daemon on the socket (not running, restarting, no permission), or it went away."""

    def __init__(self, message):
        super().__init__("not-reachable", message)


class Client:
    """One connection. Requests are answered in order; event lines of a watch that arrive
    between answers are kept for next_event()."""

    def __init__(self, path=DEFAULT_SOCKET, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self._sock = None
        self._buf = b""
        self._events = []

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise NotReachable(f"{self.path}: {e}") from e
        self._sock, self._buf = s, b""

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _line(self, timeout):
        """The next line as a dict; None when `timeout` (seconds) passes first."""
        if self._sock is None:
            self.connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as e:
                self.close()
                raise NotReachable(f"{self.path}: {e}") from e
            if not chunk:
                self.close()
                raise NotReachable(f"{self.path}: the agent closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, req):
        """Sends one request; returns its answer (a dict with "ok": true) or raises."""
        if self._sock is None:
            self.connect()
        try:
            self._sock.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            self.close()
            raise NotReachable(f"{self.path}: {e}") from e
        while True:
            answer = self._line(self.timeout)
            if answer is None:
                self.close()
                raise NotReachable(f"{self.path}: no answer within {self.timeout} s")
            if "event" in answer:
                self._events.append(answer)
                continue
            if answer.get("ok"):
                return answer
            err = answer.get("error") or {}
            raise EdgesyncError(err.get("code", "?"), err.get("message", str(answer)))

    def report(self, changes):
        """Queues changes, all or none: a dict {key: value} or a list of {"key", "value"[, "ts"]}.
        Returns (first_seq, last_seq) once they are durable."""
        if isinstance(changes, dict):
            changes = [{"key": k, "value": v} for k, v in changes.items()]
        a = self.request({"op": "report", "changes": list(changes)})
        return a["first_seq"], a["last_seq"]

    def get(self, doc, key=None):
        """The "desired" or "reported" state (a dict), or one key's value (None if it has none)."""
        req = {"op": "get", "doc": doc}
        if key is not None:
            req["key"] = key
        state = self.request(req)["state"]
        return state if key is None else state.get(key)

    def status(self):
        """The status document (PROTOCOL §2.2)."""
        return self.request({"op": "status"})

    def history(self, key, limit=None):
        req = {"op": "history", "key": key}
        if limit is not None:
            req["limit"] = limit
        return self.request(req)["history"]

    def rollback(self, key, version):
        return self.request({"op": "rollback", "key": key, "version": version})

    def watch(self, globs):
        """Takes the desired values of keys matching `globs` (their handler must be of type
        "watch"); returns the globs watched. Read the events with next_event()."""
        return self.request({"op": "watch", "keys": list(globs)})["watching"]

    def next_event(self, timeout=None):
        """The next event {"event": "desired", "id", "key", "value", "version"}; None on
        timeout. Answer each with ack() within the handler's deadline."""
        if self._events:
            return self._events.pop(0)
        return self._line(timeout)

    def ack(self, event_id, ok=True, error=None):
        req = {"op": "ack", "id": event_id, "ok": ok}
        if error is not None:
            req["error"] = error
        self.request(req)


class Watcher:
    """Watches `globs` and calls apply(key, value, version) for each event: True acks it
    applied; False or an exception acks it failed. Reconnects and watches again whenever the
    connection ends (agent restart), until stop()."""

    def __init__(self, path, globs, apply, on_watch=None, timeout=30.0):
        self.path, self.globs, self.apply = path, list(globs), apply
        self.on_watch = on_watch  # called after every successful watch (tests, logging)
        self.timeout = timeout
        self._stop = False

    def stop(self):
        self._stop = True

    def run(self):
        pause = 0.1
        while not self._stop:
            client = Client(self.path, self.timeout)
            try:
                client.watch(self.globs)
                pause = 0.1
                if self.on_watch:
                    self.on_watch()
                while not self._stop:
                    event = client.next_event(timeout=0.5)
                    if event is not None:
                        self._handle(client, event)
            except NotReachable:
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            finally:
                client.close()

    def _handle(self, client, event):
        try:
            ok, error = bool(self.apply(event["key"], event["value"], event["version"])), None
        except Exception as e:  # a failing handler fails the key, not the watcher
            ok, error = False, str(e) or type(e).__name__
        if not ok and error is None:
            error = "refused by the handler"
        client.ack(event["id"], ok, error)


def _value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv):
    path = os.environ.get("EDGESYNC_SOCKET", DEFAULT_SOCKET)
    if len(argv) >= 2 and argv[0] == "--socket":
        path, argv = argv[1], argv[2:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    op, args = argv[0], argv[1:]
    try:
        if op == "watch" and args:

            def show(key, value, version):
                print(json.dumps({"key": key, "value": value, "version": version}), flush=True)
                return True

            def watching():
                print(json.dumps({"watching": args}), flush=True)

            Watcher(path, args, show, on_watch=watching).run()
            return 0
        with Client(path) as c:
            if op == "report" and args and all("=" in a for a in args):
                print(json.dumps(c.report({k: _value(v) for k, v in (a.split("=", 1) for a in args)})))
            elif op == "get" and 1 <= len(args) <= 2:
                print(json.dumps(c.get(*args)))
            elif op == "status" and not args:
                print(json.dumps(c.status()))
            else:
                print(f"edgesync_client: bad usage: {' '.join(argv)}", file=sys.stderr)
                return 2
    except NotReachable as e:
        print(f"edgesync_client: {e}", file=sys.stderr)
        return 3
    except EdgesyncError as e:
        print(f"edgesync_client: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
