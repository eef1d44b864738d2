//! The `--serve` HTTP endpoint: `/metrics` and `/health`, one GET per
//! connection. Scrapes are answered from the last published snapshot, so a
//! slow or stuck client only holds its own task, never the event loop.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use cow_trace::metrics::{Exposition, Snapshot};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 << 10;
/// Time a client has to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
const MAX_CLIENTS: usize = 16;

pub struct Exporter {
    snapshot: Arc<Mutex<Arc<Snapshot>>>,
    pub addr: SocketAddr,
}

impl Exporter {
    /// Binds `addr` and starts serving (an empty snapshot until the first
    /// publish). Call within the runtime.
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let std = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for --serve (in use? try another port)"))?;
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        let addr = listener.local_addr()?;
        let snapshot = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
        let shared = snapshot.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let snap = shared.lock().expect("not poisoned").clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLIENT_TIMEOUT, serve(stream, snap)).await;
                    drop(permit);
                });
            }
        });
        Ok(Self { snapshot, addr })
    }

    /// Makes `snap` what the next scrapes see.
    pub fn publish(&self, snap: Snapshot) {
        *self.snapshot.lock().expect("not poisoned") = Arc::new(snap);
    }
}

/// Answers one request and closes the connection.
async fn serve(mut stream: TcpStream, snap: Arc<Snapshot>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
        }
    };
    let (status, content_type, body) = answer(&head, &snap);
    respond(&mut stream, status, content_type, &body).await
}

/// Status, content type and body for a request head.
fn answer(head: &str, snap: &Arc<Snapshot>) -> (&'static str, &'static str, String) {
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or("").split(' ');
    let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let accept = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("accept").then(|| v.trim())
    });
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let format = Exposition::negotiate(accept);
            ("200 OK", format.content_type(), snap.encode(format))
        }
        ("GET", "/health") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", "cow-trace exporter: see /metrics\n".into()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".into()),
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_negotiation() {
        let snap = Arc::new(Snapshot::default());
        let (s, ct, body) = answer(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0",
            &snap,
        );
        assert_eq!((s, ct), ("200 OK", Exposition::OpenMetrics.content_type()));
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (_, ct, body) = answer("GET /metrics HTTP/1.0", &snap);
        assert_eq!(ct, Exposition::Text.content_type());
        assert!(body.contains("# TYPE cow_trace_forks_total counter"), "{body}");
        assert_eq!(answer("GET /health HTTP/1.1", &snap).0, "200 OK");
        assert_eq!(answer("GET /nope HTTP/1.1", &snap).0, "404 Not Found");
        assert_eq!(answer("POST /metrics HTTP/1.1", &snap).0, "405 Method Not Allowed");
        assert_eq!(answer("", &snap).0, "405 Method Not Allowed");
    }
}
