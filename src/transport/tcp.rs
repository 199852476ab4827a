//! ICE-TCP (passive, RFC 6544) on the media port: an accept loop and, per
//! connection, a reader (RFC 4571 framing) and a writer task. The engine
//! routes their packets like datagrams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::metrics::{Limit, Metrics};
use crate::perip::PerIp;

/// What the ICE-TCP side tells the engine.
pub(super) enum TcpEvent {
    Opened {
        from: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    Packet {
        from: SocketAddr,
        data: Vec<u8>,
    },
    Closed {
        from: SocketAddr,
    },
}

pub(super) const TCP_EVENT_QUEUE: usize = 4096;
/// Framed packets waiting to be written to one TCP connection.
const TCP_WRITE_QUEUE: usize = 512;
/// ICE-TCP connections open at once; more are refused.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// A TCP connection that sends nothing for this long is closed (ICE
/// keepalives and consent checks come every few seconds).
const TCP_IDLE: Duration = Duration::from_secs(30);

/// Accepts ICE-TCP connections; each gets a reader (RFC 4571 framing) and a
/// writer task. The engine routes their packets like datagrams.
pub(super) async fn accept_tcp(
    listener: tokio::net::TcpListener,
    events: mpsc::Sender<TcpEvent>,
    per_ip: PerIp,
    metrics: Arc<Metrics>,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "ICE-TCP accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= MAX_TCP_CONNECTIONS {
            continue; // dropping `stream` refuses it
        }
        let Some(slot) = per_ip.acquire(from.ip()) else {
            metrics.limited(Limit::IceTcpPerIp);
            continue;
        };
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
        if events
            .send(TcpEvent::Opened { from, writer: wtx })
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = wrx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let events = events.clone();
        let open = open.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let _slot = slot;
            let mut decoder = rtc::shared::tcp_framing::TcpFrameDecoder::new();
            let mut buf = vec![0u8; 4096];
            'conn: loop {
                let n = match tokio::time::timeout(TCP_IDLE, reader.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                decoder.extend_from_slice(&buf[..n]);
                while let Some(data) = decoder.next_packet() {
                    if events.send(TcpEvent::Packet { from, data }).await.is_err() {
                        break 'conn;
                    }
                }
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let _ = events.send(TcpEvent::Closed { from }).await;
        });
    }
}

/// The next ICE-TCP event, or never when ICE-TCP is off.
pub(super) async fn next_tcp(tcp: &mut Option<mpsc::Receiver<TcpEvent>>) -> Option<TcpEvent> {
    match tcp {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
