//! A fast SMTP sink for benchmarks: accepts every message (250) and counts it, recording
//! when the first and the last one arrived. Not a test double: benchmarks only.
//!
//! It offers PIPELINING (RFC 2920) and answers as pipelining servers such as Postfix do:
//! replies to commands that arrived together go out together, written when no more input
//! is waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Counts of a running sink.
#[derive(Default)]
pub struct SinkStats {
    /// Messages accepted.
    pub messages: AtomicU64,
    /// Arrival of the first and the latest message.
    pub window: Mutex<Option<(Instant, Instant)>>,
}

impl SinkStats {
    /// Forgets everything (between runs).
    pub fn reset(&self) {
        self.messages.store(0, Ordering::SeqCst);
        *self.window.lock().expect("lock") = None;
    }
}

/// Starts the sink on a free loopback port; returns the port and its counters.
pub async fn start() -> anyhow::Result<(u16, Arc<SinkStats>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stats = Arc::new(SinkStats::default());
    let shared = stats.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let stats = shared.clone();
            tokio::spawn(async move {
                let _ = session(socket, stats).await;
            });
        }
    });
    Ok((port, stats))
}

async fn session(socket: tokio::net::TcpStream, stats: Arc<SinkStats>) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let (read, mut write) = socket.into_split();
    let mut reader = BufReader::new(read);
    write.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(1024);
    let mut replies = Vec::with_capacity(256);
    let mut in_data = false;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if in_data {
            if line == b".\r\n" {
                in_data = false;
                let now = Instant::now();
                {
                    let mut window = stats.window.lock().expect("lock");
                    let first = window.map_or(now, |(first, _)| first);
                    *window = Some((first, now));
                }
                stats.messages.fetch_add(1, Ordering::SeqCst);
                replies.extend_from_slice(b"250 2.0.0 accepted\r\n");
            }
        } else {
            let upper = line.to_ascii_uppercase();
            if upper.starts_with(b"EHLO") {
                replies.extend_from_slice(
                    b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n",
                );
            } else if upper.starts_with(b"DATA") {
                in_data = true;
                replies.extend_from_slice(b"354 go ahead\r\n");
            } else if upper.starts_with(b"QUIT") {
                replies.extend_from_slice(b"221 bye\r\n");
                write.write_all(&replies).await?;
                return Ok(());
            } else {
                replies.extend_from_slice(b"250 OK\r\n");
            }
        }
        if !replies.is_empty() && reader.buffer().is_empty() {
            write.write_all(&replies).await?;
            replies.clear();
        }
    }
}
