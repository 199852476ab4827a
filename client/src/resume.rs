//! Getting the signaling connection back after it drops (protocol 1.1
//! `resume`): when to try again, and the connection attempt itself, which
//! runs beside the client task so media keeps flowing meanwhile.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
pub(crate) type WsSink = futures_util::stream::SplitSink<Ws, Message>;
pub(crate) type WsStream = futures_util::stream::SplitStream<Ws>;

/// Messages kept while the signaling connection is down, sent after
/// `resumed`; past this the oldest are dropped.
pub(crate) const PENDING_WHILE_DOWN: usize = 256;
/// Reconnection attempts before the client gives up.
pub(crate) const MAX_ATTEMPTS: u32 = 30;

/// The next frame of the signaling connection; never resolves while it is
/// down.
pub(crate) async fn next_frame(
    link: &mut Option<(WsSink, WsStream)>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match link {
        Some((_, stream)) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// A connection attempt's result; never resolves without one running.
pub(crate) async fn attempt(
    connecting: &mut Option<tokio::sync::oneshot::Receiver<Option<Ws>>>,
) -> Option<Ws> {
    match connecting {
        Some(rx) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// First wait before reconnecting; doubles per failed attempt.
const FIRST: Duration = Duration::from_millis(250);
/// Longest wait between attempts.
const MOST: Duration = Duration::from_secs(4);
/// One attempt's limit (connect and WebSocket handshake).
const ATTEMPT: Duration = Duration::from_secs(3);

/// The wait before attempt `attempt` (0-based): 250 ms doubling up to 4 s,
/// with ±30 % jitter so a server restart is not met by every client at
/// once.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = FIRST.saturating_mul(1u32 << attempt.min(5)).min(MOST);
    let jitter = 0.7 + rand::random::<f64>() * 0.6;
    base.mul_f64(jitter)
}

/// Starts one connection attempt to `url`; its result arrives on the
/// receiver.
pub(crate) fn connect(url: String) -> oneshot::Receiver<Option<Ws>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let ws = tokio::time::timeout(
            ATTEMPT,
            tokio_tungstenite::connect_async_with_config(url, Some(crate::ws_config()), false),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|(ws, _)| ws);
        let _ = tx.send(ws);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_a_cap_with_jitter() {
        for attempt in 0..12 {
            let d = backoff(attempt);
            let base = FIRST.saturating_mul(1u32 << attempt.min(5)).min(MOST);
            assert!(
                d >= base.mul_f64(0.69) && d <= base.mul_f64(1.31),
                "{attempt}: {d:?}"
            );
        }
        assert!(backoff(20) <= MOST.mul_f64(1.31));
    }
}
