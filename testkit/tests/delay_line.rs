//! The fault proxy's delay line: a delay is latency, not a throughput cap (many chunks in
//! flight), the bandwidth cap holds with and without it, the line is bounded, and the other
//! faults still act at once on bytes held in the line.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions only, not helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::{connect, echo_server};
use edgesync_testkit::FaultProxy;

/// A server that reads each connection to EOF and reports (bytes, instant of the EOF).
fn sink_server() -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tx.send((total, Instant::now()));
            });
        }
    });
    (addr, rx)
}

/// Echoes `msg` (writing from another thread, so a large one cannot deadlock) and returns
/// the time until the whole echo came back.
fn timed_echo(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let mut w = s.try_clone().unwrap();
    let out = msg.to_vec();
    let t = Instant::now();
    let writer = thread::spawn(move || w.write_all(&out).unwrap());
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    let elapsed = t.elapsed();
    writer.join().unwrap();
    assert!(got == msg, "echo differs");
    elapsed
}

/// Sends `n` bytes through the proxy to a sink and returns the time until the sink saw the
/// EOF that follows them.
fn timed_upload(proxy: &FaultProxy, rx: &mpsc::Receiver<(u64, Instant)>, n: usize) -> Duration {
    let mut s = connect(proxy);
    let t = Instant::now();
    s.write_all(&vec![5u8; n]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, at) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(got, n as u64);
    at - t
}

#[test]
fn delay_is_added_once_per_direction_not_once_per_chunk() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    assert!(timed_echo(&mut s, b"warm") < Duration::from_secs(5));
    proxy.delay(Duration::from_millis(150));

    let small = timed_echo(&mut s, b"x");
    assert!(small >= Duration::from_millis(300), "{small:?}");
    assert!(small < Duration::from_millis(1500), "{small:?}");

    // 400 kB is ~25 chunks of 16 KiB: a chunk-at-a-time delay would take > 2 × 25 × 150 ms.
    let big = timed_echo(&mut s, &vec![9u8; 400_000]);
    assert!(big >= Duration::from_millis(300), "{big:?}");
    assert!(big < Duration::from_millis(2000), "{big:?}");
}

#[test]
fn with_a_delay_throughput_is_the_cap_not_a_fraction_of_it() {
    let (addr, rx) = sink_server();
    let proxy = FaultProxy::start(addr).unwrap();
    proxy.bandwidth(250_000);
    proxy.delay(Duration::from_millis(100));
    // 500 kB at 250 kB/s: 2 s of pacing (the first slice goes at once) + 0.1 s of delay.
    // The cap holds: not under 1.9 s; the delay line keeps the link full: well under the
    // ~5 s a chunk-at-a-time delay takes (31 chunks × (100 ms + 66 ms)).
    let t = timed_upload(&proxy, &rx, 500_000);
    assert!(t >= Duration::from_millis(1900), "{t:?}");
    assert!(t < Duration::from_millis(3200), "{t:?}");
    assert_eq!(proxy.bytes_up(), 500_000);
}

#[test]
fn the_cap_holds_without_a_delay_and_both_ways() {
    let (addr, rx) = sink_server();
    let proxy = FaultProxy::start(addr).unwrap();
    proxy.bandwidth(200_000);
    let t = timed_upload(&proxy, &rx, 200_000);
    assert!(t >= Duration::from_millis(900), "{t:?}");
    assert!(t < Duration::from_millis(3000), "{t:?}");

    // Echo of 100 kB at 100 kB/s each way with 50 ms each way: the directions overlap, so
    // about 1 s + 0.1 s, not 2 s.
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    proxy.bandwidth(100_000);
    proxy.delay(Duration::from_millis(50));
    let t = timed_echo(&mut s, &vec![1u8; 100_000]);
    assert!(t >= Duration::from_millis(950), "{t:?}");
    assert!(t < Duration::from_millis(1900), "{t:?}");
}

#[test]
fn the_delay_line_is_bounded_so_a_fast_sender_is_back_pressured() {
    let (addr, _rx) = sink_server();
    let proxy = FaultProxy::start(addr).unwrap();
    proxy.bandwidth(1_000);
    proxy.delay(Duration::from_millis(100));
    let mut s = connect(&proxy);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Without a bound the proxy would read all of it; with one, the line (4 MiB) and the
    // kernel's socket buffers fill and a write blocks.
    let block = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    let stalled = loop {
        if sent >= 256 << 20 {
            break false;
        }
        match s.write(&block) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break true;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert!(stalled, "{sent} bytes written without back-pressure");
    assert!(sent < 64 << 20, "{sent}");
    assert!(proxy.bytes_up() < 64 << 10, "{}", proxy.bytes_up());
}

#[test]
fn faults_act_at_once_on_bytes_held_in_the_delay_line() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    // A connection known to be through (an echo came back), then bytes held for 3 s.
    let held = |proxy: &FaultProxy| {
        proxy.delay(Duration::ZERO);
        let mut s = connect(proxy);
        assert!(timed_echo(&mut s, b"up") < Duration::from_secs(5));
        proxy.delay(Duration::from_secs(3));
        s.write_all(b"held").unwrap();
        s
    };

    // Cut: EOF now, not after the delay; the held bytes are dropped.
    let mut s = held(&proxy);
    let t = Instant::now();
    proxy.cut();
    let mut buf = [0u8; 4];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    proxy.restore();

    // Reset: RST now.
    let mut s = held(&proxy);
    let t = Instant::now();
    proxy.reset_all();
    let err = s.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Blackhole: held bytes wait for restore, then arrive once due.
    proxy.delay(Duration::from_millis(100));
    let mut s = connect(&proxy);
    assert!(timed_echo(&mut s, b"a") >= Duration::from_millis(200));
    proxy.blackhole();
    s.write_all(b"late!").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut five = [0u8; 5];
    let err = s.read(&mut five).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err:?}"
    );
    proxy.restore();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"late!");

    // Fragmentation and drop-after apply on the forwarding side.
    proxy.fragment(true);
    let msg: Vec<u8> = (0..200u8).collect();
    assert!(timed_echo(&mut s, &msg) >= Duration::from_millis(200));
    proxy.fragment(false);
    let up = proxy.bytes_up();
    proxy.drop_after(10);
    s.write_all(&[7u8; 25]).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() <= 10, "{got:?}");
    assert_eq!(proxy.bytes_up(), up + 10);
}
