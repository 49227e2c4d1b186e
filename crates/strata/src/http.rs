//! A minimal HTTP/1 endpoint for `/metrics` (Prometheus) and `/healthz` (kubelet liveness).
//! Plain tokio, one request per connection: scrapes and probes need nothing more.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strata_core::Driver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// What an address serves.
#[derive(Clone)]
pub struct Endpoints {
    pub driver: Arc<Driver>,
    pub metrics: Option<Arc<Metrics>>,
    pub health: bool,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))
}

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE) and the like: back off instead of spinning.
                tracing::warn!(error = %e, "http accept failed; retrying shortly");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, endpoints).await {
                tracing::debug!(error = %e, "http request failed");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, endpoints: Endpoints) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // The request head, bounded in size and time.
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if n == 0 || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                return Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") if endpoints.metrics.is_some() => {
            let (metrics, driver) = (endpoints.metrics.clone(), endpoints.driver.clone());
            let text = tokio::task::spawn_blocking(move || {
                metrics.map(|m| m.render(&driver)).unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        ("GET", "/healthz") if endpoints.health => {
            let driver = endpoints.driver.clone();
            match tokio::task::spawn_blocking(move || driver.probe()).await {
                Ok(Ok(())) => ("200 OK", "text/plain", "ok\n".to_owned()),
                Ok(Err(e)) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
                Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
            }
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
