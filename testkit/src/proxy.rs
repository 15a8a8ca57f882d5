//! A fault-injecting TCP proxy between the agent and a broker: the way to make a broker
//! "go away", stall, slow down or misbehave, with any broker (rumqttd cannot be stopped).
//!
//! It listens on a free 127.0.0.1 port and forwards each accepted connection to `upstream`.
//! It runs on its own thread with its own single-threaded tokio runtime, so synchronous
//! tests and tests on any runtime (including paused time) can use it; every control method
//! takes `&self`, applies at once to live connections and is thread-safe.
//!
//! | control | effect |
//! | --- | --- |
//! | [`cut`](FaultProxy::cut) | closes (FIN) both sides of every connection; new connections are accepted and closed at once, until `restore` |
//! | [`blackhole`](FaultProxy::blackhole) | connections stay open but no byte moves either way (no FIN, no RST: a silent dead link); bytes already read are held and delivered after `restore`, as TCP retransmission would; new connections are accepted but not connected upstream until `restore` |
//! | [`restore`](FaultProxy::restore) | ends `cut` / `blackhole` |
//! | [`reset_all`](FaultProxy::reset_all) | RST (SO_LINGER 0, close) both sides of every current connection |
//! | [`delay`](FaultProxy::delay) | forwards each chunk this long after it was read, both ways: a delay line with many chunks in flight (a pipe with latency), holding up to 4 MiB per direction before the sender is back-pressured |
//! | [`bandwidth`](FaultProxy::bandwidth) | caps each direction of each connection to N bytes/s (0 = no cap), paced on the forwarding side in slices of 1/20 s |
//! | [`fragment`](FaultProxy::fragment) | forwards one byte per write |
//! | [`drop_after`](FaultProxy::drop_after) | closes a connection (FIN both sides) once it has forwarded N more bytes upstream (client → broker), counted per connection from the call or from the connection's start |
//! | [`clear`](FaultProxy::clear) | all of the above off |
//!
//! Normal end of a connection: an EOF on one side is passed on as a half-close (FIN) to the
//! other; a read or write error closes both sides. If the upstream refuses the connection,
//! the client's connection is closed.
//!
//! In front of rumqttd, note that rumqttd runs TLS handshakes one at a time without a
//! timeout: a connection blackholed in the middle of its handshake stalls rumqttd's TLS
//! listener for every other client until `restore()` or until the connection closes. (New
//! connections during a blackhole do not reach rumqttd, so they do not stall it.)

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Cut,
    Blackhole,
}

#[derive(Debug, Clone)]
struct Control {
    mode: Mode,
    upstream: SocketAddr,
    /// Bumped by `reset_all`: connections older than the current epoch reset.
    reset_epoch: u64,
    delay: Duration,
    /// Bytes per second per direction; 0 = unlimited.
    bandwidth: u64,
    fragment: bool,
    drop_after: Option<u64>,
    /// Bumped by `drop_after`: connections restart their byte count.
    drop_epoch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

/// The fault-injecting proxy; stops (closing every connection) on drop.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    ctl: watch::Sender<Control>,
    counters: Arc<Counters>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("proxy: binding 127.0.0.1:0: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy: local_addr: {e}"))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("proxy: set_nonblocking: {e}"))?;
        let (ctl, _) = watch::channel(Control {
            mode: Mode::Pass,
            upstream,
            reset_epoch: 0,
            delay: Duration::ZERO,
            bandwidth: 0,
            fragment: false,
            drop_after: None,
            drop_epoch: 0,
        });
        let counters = Arc::new(Counters::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("proxy: building runtime: {e}"))?;
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = {
            let ctl = ctl.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name(format!("fault-proxy-{port}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                eprintln!("fault proxy {port}: {e}");
                                return;
                            }
                        };
                        tokio::select! {
                            _ = shutdown_rx => {}
                            () = accept_loop(listener, ctl, counters) => {}
                        }
                    });
                    // Dropping the runtime cancels every connection task: sockets close.
                    drop(runtime);
                })
                .map_err(|e| format!("proxy: spawning thread: {e}"))?
        };
        Ok(FaultProxy {
            port,
            ctl,
            counters,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy's address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.ctl.send_modify(|c| c.mode = Mode::Cut);
    }

    /// Stops every byte without closing anything until [`restore`](Self::restore).
    pub fn blackhole(&self) {
        self.ctl.send_modify(|c| c.mode = Mode::Blackhole);
    }

    /// Ends [`cut`](Self::cut) or [`blackhole`](Self::blackhole).
    pub fn restore(&self) {
        self.ctl.send_modify(|c| c.mode = Mode::Pass);
    }

    /// Resets (RST) every current connection.
    pub fn reset_all(&self) {
        self.ctl.send_modify(|c| c.reset_epoch += 1);
    }

    /// Forwards each chunk `d` after it was read, with many chunks in flight
    /// (`Duration::ZERO`: no delay). Chunks already read keep the delay they were read with.
    pub fn delay(&self, d: Duration) {
        self.ctl.send_modify(|c| c.delay = d);
    }

    /// Caps each direction of each connection to `bytes_per_sec` (0: no cap).
    pub fn bandwidth(&self, bytes_per_sec: u64) {
        self.ctl.send_modify(|c| c.bandwidth = bytes_per_sec);
    }

    /// Forwards one byte per write while on.
    pub fn fragment(&self, on: bool) {
        self.ctl.send_modify(|c| c.fragment = on);
    }

    /// Closes each connection once it has forwarded `n_bytes` more bytes upstream.
    pub fn drop_after(&self, n_bytes: u64) {
        self.ctl.send_modify(|c| {
            c.drop_after = Some(n_bytes);
            c.drop_epoch += 1;
        });
    }

    /// Turns every fault off (mode, delay, bandwidth, fragmentation, drop-after).
    pub fn clear(&self) {
        self.ctl.send_modify(|c| {
            c.mode = Mode::Pass;
            c.delay = Duration::ZERO;
            c.bandwidth = 0;
            c.fragment = false;
            c.drop_after = None;
        });
    }

    /// Sends new connections to another upstream from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.ctl.send_modify(|c| c.upstream = upstream);
    }

    /// Connections accepted so far (including those closed at once during a cut).
    pub fn connections_accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn connections_open(&self) -> u64 {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Bytes forwarded client → upstream.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded upstream → client.
    pub fn bytes_down(&self) -> u64 {
        self.counters.down.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    ctl: watch::Sender<Control>,
    counters: Arc<Counters>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        if ctl.borrow().mode == Mode::Cut {
            drop(client);
            continue;
        }
        let ctl = ctl.subscribe();
        let counters = counters.clone();
        tokio::spawn(async move {
            counters.open.fetch_add(1, Ordering::SeqCst);
            connection(client, ctl, &counters).await;
            counters.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Why a pump stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its source sent EOF; passed on as a half-close.
    Eof,
    /// Close both sides (cut, drop-after, an I/O error).
    Close,
    /// Reset both sides.
    Reset,
}

/// Everything a pump watches to know it must stop.
struct Watch {
    ctl: watch::Receiver<Control>,
    /// Set by the other direction's pump when it closes or resets the connection.
    conn: watch::Receiver<Option<End>>,
    reset_epoch: u64,
}

impl Watch {
    /// Returns once bytes may flow; `Err` when the connection must end.
    async fn gate(&mut self) -> std::result::Result<(), End> {
        loop {
            if let Some(end) = *self.conn.borrow_and_update() {
                return Err(end);
            }
            let mode = {
                let c = self.ctl.borrow_and_update();
                if c.reset_epoch != self.reset_epoch {
                    return Err(End::Reset);
                }
                c.mode
            };
            match mode {
                Mode::Pass => return Ok(()),
                Mode::Cut => return Err(End::Close),
                Mode::Blackhole => self.changed().await?,
            }
        }
    }

    /// Waits for any change of the controls or of the connection.
    async fn changed(&mut self) -> std::result::Result<(), End> {
        tokio::select! {
            r = self.ctl.changed() => r.map_err(|_| End::Close),
            r = self.conn.changed() => r.map_err(|_| End::Close),
        }
    }

    /// Runs `fut` to completion unless the connection is cut or reset meanwhile.
    async fn guard<F: std::future::Future>(
        &mut self,
        fut: F,
    ) -> std::result::Result<F::Output, End> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                r = self.changed() => {
                    r?;
                    if let Some(end) = *self.conn.borrow() {
                        return Err(end);
                    }
                    let c = self.ctl.borrow();
                    if c.reset_epoch != self.reset_epoch {
                        return Err(End::Reset);
                    }
                    if c.mode == Mode::Cut {
                        return Err(End::Close);
                    }
                }
            }
        }
    }
}

async fn connection(client: TcpStream, ctl: watch::Receiver<Control>, counters: &Counters) {
    let reset_epoch = ctl.borrow().reset_epoch;
    let (conn_tx, conn_rx) = watch::channel(None);
    let mut w = Watch {
        ctl: ctl.clone(),
        conn: conn_rx.clone(),
        reset_epoch,
    };
    // A blackholed link does not reach the broker either.
    if let Err(end) = w.gate().await {
        if end == End::Reset {
            let _ = client.set_zero_linger();
        }
        return;
    }
    let upstream_addr = ctl.borrow().upstream;
    let upstream = match w.guard(TcpStream::connect(upstream_addr)).await {
        Ok(Ok(s)) => s,
        // Upstream down: close the client, as a dead broker would refuse it.
        Ok(Err(_)) | Err(End::Close | End::Eof) => return,
        Err(End::Reset) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let up = Pump {
        src: client_r,
        dst: up_w,
        upstream: true,
        watch: w,
        conn_tx: &conn_tx,
        counter: &counters.up,
    };
    let down = Pump {
        src: up_r,
        dst: client_w,
        upstream: false,
        watch: Watch {
            ctl,
            conn: conn_rx,
            reset_epoch,
        },
        conn_tx: &conn_tx,
        counter: &counters.down,
    };
    tokio::join!(up.run(), down.run());
}

/// Bytes read and not yet forwarded that one direction may hold while a delay is set: the
/// link's buffer. A sender that outruns the cap fills it and is then back-pressured by TCP,
/// as by a real bottleneck. Without a delay one chunk at a time is held, as a plain relay.
const LINE_MAX_BYTES: usize = 4 << 20;
/// Largest read; also the unit a delay is applied to.
const CHUNK: usize = 16 * 1024;

/// A chunk in the delay line; an empty one is the source's EOF.
struct Item {
    bytes: Vec<u8>,
    due: Instant,
}

/// One direction of a connection: a reader that time-stamps each chunk into the delay line
/// and a writer that forwards each chunk when due, paced to the bandwidth cap. Many chunks
/// are in flight at once, so a delay adds latency without capping throughput.
struct Pump<'a> {
    src: OwnedReadHalf,
    dst: OwnedWriteHalf,
    /// Client → upstream (subject to drop-after).
    upstream: bool,
    watch: Watch,
    conn_tx: &'a watch::Sender<Option<End>>,
    counter: &'a AtomicU64,
}

impl Pump<'_> {
    async fn run(self) {
        let Pump {
            mut src,
            mut dst,
            upstream,
            watch: w,
            conn_tx,
            counter,
        } = self;
        let (line_tx, line_rx) = mpsc::unbounded_channel();
        let (held_tx, held_rx) = watch::channel(0usize);
        let rw = Watch {
            ctl: w.ctl.clone(),
            conn: w.conn.clone(),
            reset_epoch: w.reset_epoch,
        };
        // A side that closes or resets tells the other side and the other direction at once.
        let signal = |r: std::result::Result<Infallible, End>| {
            let Err(end) = r;
            if end != End::Eof {
                conn_tx.send_replace(Some(end));
            }
            end
        };
        let reader = async { signal(read_side(&mut src, rw, line_tx, &held_tx, held_rx).await) };
        let writer = async {
            let out = Writer {
                dst: &mut dst,
                watch: w,
                held: &held_tx,
                upstream,
                counter,
            };
            signal(out.run(line_rx).await)
        };
        let (r, wr) = tokio::join!(reader, writer);
        let end = match (r, wr) {
            (End::Eof, End::Eof) => End::Eof,
            (End::Reset, _) | (_, End::Reset) => End::Reset,
            _ => End::Close,
        };
        match end {
            End::Eof => {
                let _ = dst.shutdown().await;
            }
            End::Close => {}
            End::Reset => {
                let _ = src.as_ref().set_zero_linger();
                let _ = dst.as_ref().set_zero_linger();
                // Dropping a write half sends FIN first; the peer would read EOF, not RST.
                dst.forget();
            }
        }
        // Dropping the halves closes the sockets once the other pump has dropped its own.
    }
}

/// Reads chunks into the delay line while it has room; returns how the direction ends.
async fn read_side(
    src: &mut OwnedReadHalf,
    mut w: Watch,
    line: mpsc::UnboundedSender<Item>,
    held_tx: &watch::Sender<usize>,
    mut held: watch::Receiver<usize>,
) -> std::result::Result<Infallible, End> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        w.gate().await?;
        let room = if w.ctl.borrow().delay.is_zero() {
            1
        } else {
            LINE_MAX_BYTES
        };
        w.guard(async { held.wait_for(|h| *h < room).await.map(|_| ()) })
            .await?
            .map_err(|_| End::Close)?;
        let n = match w.guard(src.read(&mut buf)).await? {
            Ok(n) => n,
            // A close on one side does not cross a blackholed link either.
            Err(_) => return Err(w.gate().await.err().unwrap_or(End::Close)),
        };
        let due = Instant::now() + w.ctl.borrow().delay;
        held_tx.send_modify(|h| *h += n);
        // The EOF travels the line behind the data, delayed like it.
        if line
            .send(Item {
                bytes: buf[..n].to_vec(),
                due,
            })
            .is_err()
        {
            return Err(End::Close);
        }
        if n == 0 {
            return Err(End::Eof);
        }
    }
}

/// Forwards the delay line's chunks when due, applying the cap, fragmentation and drop-after.
struct Writer<'a> {
    dst: &'a mut OwnedWriteHalf,
    watch: Watch,
    held: &'a watch::Sender<usize>,
    upstream: bool,
    counter: &'a AtomicU64,
}

impl Writer<'_> {
    async fn run(
        mut self,
        mut line: mpsc::UnboundedReceiver<Item>,
    ) -> std::result::Result<Infallible, End> {
        let (mut drop_epoch, mut since_drop_set) = (self.watch.ctl.borrow().drop_epoch, 0u64);
        // Pacing clock: the earliest time the next piece may go out under the cap.
        let mut next_slot = Instant::now();
        loop {
            let Some(item) = self.watch.guard(line.recv()).await? else {
                // The reader stopped without an EOF: it has already said why.
                return Err((*self.watch.conn.borrow()).unwrap_or(End::Close));
            };
            if item.due > Instant::now() {
                self.watch.guard(tokio::time::sleep_until(item.due)).await?;
            }
            let n = item.bytes.len();
            if n == 0 {
                return Err(self.watch.gate().await.err().unwrap_or(End::Eof));
            }
            let mut off = 0;
            while off < n {
                let bandwidth = self.watch.ctl.borrow().bandwidth;
                if bandwidth > 0 {
                    let now = Instant::now();
                    if next_slot > now {
                        self.watch
                            .guard(tokio::time::sleep_until(next_slot))
                            .await?;
                    } else {
                        // An idle link earns no credit: bursts stay one slice.
                        next_slot = now;
                    }
                }
                self.watch.gate().await?;
                let c = self.watch.ctl.borrow().clone();
                let mut piece = n - off;
                if c.fragment {
                    piece = 1;
                }
                if c.bandwidth > 0 {
                    // Slices of ~1/20 s keep the rate smooth.
                    let slice = usize::try_from((c.bandwidth / 20).max(1)).unwrap_or(usize::MAX);
                    piece = piece.min(slice);
                }
                let mut limit = None;
                if self.upstream
                    && let Some(max) = c.drop_after
                {
                    if c.drop_epoch != drop_epoch {
                        drop_epoch = c.drop_epoch;
                        since_drop_set = 0;
                    }
                    let left = max.saturating_sub(since_drop_set);
                    if left == 0 {
                        return Err(End::Close);
                    }
                    piece = piece.min(usize::try_from(left).unwrap_or(usize::MAX));
                    limit = Some(max);
                }
                let chunk = &item.bytes[off..off + piece];
                if self.watch.guard(self.dst.write_all(chunk)).await?.is_err() {
                    return Err(End::Close);
                }
                self.counter.fetch_add(piece as u64, Ordering::SeqCst);
                since_drop_set += piece as u64;
                off += piece;
                if c.bandwidth > 0 {
                    next_slot += Duration::from_secs_f64(piece as f64 / c.bandwidth as f64);
                }
                if limit.is_some_and(|max| since_drop_set >= max) {
                    let _ = self.dst.flush().await;
                    return Err(End::Close);
                }
            }
            self.held.send_modify(|h| *h = h.saturating_sub(n));
        }
    }
}
