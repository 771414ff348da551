//! A TCP proxy between the gateway and the cloud broker that a test can cut and restore.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a cut link swallows traffic before its connections close: like a real outage,
/// what was on the wire when the link went down never arrives.
const BLACKHOLE: Duration = Duration::from_millis(300);

/// Forwards 127.0.0.1:`port` to 127.0.0.1:`target`. On a cut, live connections lose
/// whatever is sent for [`BLACKHOLE`], then close both ways; while cut, new connections
/// are accepted and dropped at once.
pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<bool>,
    /// Added to everything the target sends back (a slow cloud: late acknowledgements).
    delay: watch::Sender<Duration>,
    /// While set, what the gateway sends is swallowed (its acknowledgements are lost).
    mute: watch::Sender<bool>,
    forwarded: Arc<AtomicUsize>,
    /// When each connection attempt came, cut or not.
    attempts: Arc<Mutex<Vec<Instant>>>,
    listener: JoinHandle<()>,
}

impl Proxy {
    /// Must be called inside a tokio runtime (the proxy's tasks run on it).
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, cut_rx) = watch::channel(false);
        let (delay, delay_rx) = watch::channel(Duration::ZERO);
        let (mute, mute_rx) = watch::channel(false);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let counter = forwarded.clone();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let log = attempts.clone();
        let listener = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
                if *cut_rx.borrow() {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(forward(
                    inbound,
                    target,
                    cut_rx.clone(),
                    delay_rx.clone(),
                    mute_rx.clone(),
                    counter.clone(),
                ));
            }
        });
        Proxy {
            port,
            cut,
            delay,
            mute,
            forwarded,
            attempts,
            listener,
        }
    }

    /// The link goes down: live connections go silent, then close; new ones are refused.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// The link comes back.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// From now on, what the target sends arrives `delay` later (order kept).
    pub fn slow_down(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }

    /// From now on (until [`unmute`](Self::unmute)), what the gateway sends is lost on the
    /// way: the target never sees its acknowledgements.
    pub fn mute(&self) {
        self.mute.send_replace(true);
    }

    pub fn unmute(&self) {
        self.mute.send_replace(false);
    }

    /// Connections that reached the target so far (none refused while cut, none the
    /// target refused).
    pub fn connections(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// When every connection attempt so far came (those refused while cut included).
    pub fn attempts(&self) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.listener.abort();
    }
}

async fn forward(
    inbound: TcpStream,
    target: u16,
    mut cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
    mute: watch::Receiver<bool>,
    forwarded: Arc<AtomicUsize>,
) {
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    forwarded.fetch_add(1, Ordering::SeqCst);
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = pump(in_read, out_write, cut.clone(), mute) => {}
        _ = pump_delayed(out_read, in_write, cut.clone(), delay) => {}
        _ = async {
            let _ = cut.wait_for(|cut| *cut).await;
            tokio::time::sleep(BLACKHOLE).await;
        } => {}
    }
    // Dropping both streams closes both directions at the same moment.
}

/// Copies one direction; once the link is cut (or while muted), what arrives is lost.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: watch::Receiver<bool>,
    mute: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !*cut.borrow() && !*mute.borrow() && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Like [`pump`], each chunk held back by the delay in force when it was read.
async fn pump_delayed(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = tokio::time::Instant::now() + *delay.borrow();
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if !*cut.borrow() && to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer finishes what the reader queued before the peer's close, like a slow link.
    tokio::join!(reader, writer);
}
