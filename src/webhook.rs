//! Webhooks: room and participant events POSTed to `--webhook-url`s,
//! signed as LiveKit signs them.
//!
//! Each URL has its own bounded queue and one delivery task, so events reach
//! a URL in the order they happened and a slow or dead receiver delays only
//! its own queue. [`Webhooks::emit`] never waits: when a queue is full the
//! event is dropped and counted. A failed POST (error, non-2xx, no answer in
//! 5 s) is retried with exponential backoff from 500 ms: 7 attempts over
//! about 31 s, then the event is dropped and counted.
//!
//! Signature: `Authorization: <JWT>` (no `Bearer`), HS256 with the server's
//! API key as `iss`, `exp` five minutes ahead and `sha256` = base64 of the
//! SHA-256 of the body; LiveKit's `WebhookReceiver` verifies exactly that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::{Digest, Sha256};
use switchboard_proto::{AudioMode, MediaMode};
use tokio::sync::mpsc;

use crate::auth::Keys;
use crate::metrics::Metrics;

/// Events waiting per URL.
pub const QUEUE_CAPACITY: usize = 1024;
/// Attempts per event (the first and six retries).
pub const MAX_ATTEMPTS: u32 = 7;
/// Delay before the first retry; doubles after each.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How long one POST may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The room an event is about.
#[derive(Debug, Clone, Serialize)]
pub struct RoomRef {
    pub name: String,
    pub mode: MediaMode,
    pub audio: AudioMode,
}

/// The participant an event is about.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantRef {
    pub id: String,
    pub identity: Option<String>,
    pub name: String,
}

/// The track an event is about.
#[derive(Debug, Clone, Serialize)]
pub struct TrackRef {
    pub kind: &'static str,
    pub mid: String,
}

/// One event, before it gets its id and time.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: &'static str,
    pub room: RoomRef,
    pub participant: Option<ParticipantRef>,
    pub track: Option<TrackRef>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    event: &'a str,
    id: String,
    created_at: u64,
    room: &'a RoomRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    participant: Option<&'a ParticipantRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    track: Option<&'a TrackRef>,
}

#[derive(Serialize)]
struct WebhookClaims<'a> {
    iss: &'a str,
    nbf: u64,
    exp: u64,
    sha256: String,
}

/// The webhook senders; cheap to call from any thread.
pub struct Webhooks {
    queues: Vec<mpsc::Sender<Bytes>>,
    next_id: AtomicU64,
    /// Distinguishes ids across restarts.
    boot: u64,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// Starts one delivery task per URL on the current runtime. With no URL
    /// (or no key) it sends nothing.
    pub fn start(urls: &[String], keys: &Keys, metrics: Arc<Metrics>) -> Webhooks {
        let mut queues = Vec::new();
        if let Some((key, secret)) = keys.primary() {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            for url in urls {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                queues.push(tx);
                tokio::spawn(deliver(
                    url.clone(),
                    key.to_owned(),
                    secret.to_owned(),
                    client.clone(),
                    rx,
                    metrics.clone(),
                ));
            }
        }
        Webhooks {
            queues,
            next_id: AtomicU64::new(1),
            boot: rand::random::<u32>().into(),
            metrics,
        }
    }

    /// Whether any URL is configured.
    pub fn is_on(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Queues `event` for every URL; never waits.
    pub fn emit(&self, event: Event) {
        if self.queues.is_empty() {
            return;
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Body {
            event: event.event,
            id: format!("EV_{:08x}{n:08}", self.boot),
            created_at: crate::auth::unix_now(),
            room: &event.room,
            participant: event.participant.as_ref(),
            track: event.track.as_ref(),
        };
        let Ok(text) = serde_json::to_vec(&body) else {
            return;
        };
        let text = Bytes::from(text);
        for q in &self.queues {
            if q.try_send(text.clone()).is_err() {
                self.metrics.webhooks.dropped_queue_full();
            }
        }
    }
}

/// The `Authorization` value for `body`.
pub fn sign(key: &str, secret: &str, body: &[u8], now: u64) -> Option<String> {
    let sha256 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    let claims = WebhookClaims {
        iss: key,
        nbf: now,
        exp: now + 300,
        sha256,
    };
    crate::auth::sign_with(secret, &claims).ok()
}

async fn deliver(
    url: String,
    key: String,
    secret: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    mut rx: mpsc::Receiver<Bytes>,
    metrics: Arc<Metrics>,
) {
    while let Some(body) = rx.recv().await {
        let mut backoff = FIRST_BACKOFF;
        let mut delivered = false;
        for attempt in 1..=MAX_ATTEMPTS {
            match post(&client, &url, &key, &secret, &body).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    metrics.webhooks.failed_attempts.inc();
                    tracing::debug!(%url, attempt, error = %e, "webhook attempt failed");
                    if attempt < MAX_ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        if delivered {
            metrics.webhooks.delivered.inc();
        } else {
            tracing::warn!(%url, "webhook event dropped after {MAX_ATTEMPTS} attempts");
            metrics.webhooks.dropped_gave_up();
        }
    }
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    key: &str,
    secret: &str,
    body: &Bytes,
) -> Result<(), String> {
    let auth = sign(key, secret, body, crate::auth::unix_now()).ok_or("cannot sign")?;
    let req = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/webhook+json")
        .header(hyper::header::AUTHORIZATION, auth)
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req))
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_carries_the_body_hash() {
        let secret = "s".repeat(32);
        let body = br#"{"event":"room_started"}"#;
        let token = sign("k", &secret, body, 1_000).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["iss"], "k");
        assert_eq!(data.claims["exp"], 1_300);
        let want = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        assert_eq!(data.claims["sha256"], want.as_str());
    }

    fn event(n: usize) -> Event {
        Event {
            event: "participant_joined",
            room: RoomRef {
                name: format!("r{n}"),
                mode: MediaMode::P2p,
                audio: AudioMode::Mix,
            },
            participant: None,
            track: None,
        }
    }

    fn sample(metrics: &Metrics, name: &str) -> f64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The queue is bounded: `emit` drops (and counts) what does not fit
    /// instead of waiting or growing.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let keys = Keys::load(Some("k"), Some(&"s".repeat(32)), None).unwrap();
        let metrics = Arc::new(Metrics::new());
        // Two URLs, two queues. On this single-threaded runtime the delivery
        // tasks cannot run (and take anything out) before this test yields,
        // which it never does: nothing is sent anywhere.
        let urls = [
            "http://127.0.0.1:9/a".to_owned(),
            "http://127.0.0.1:9/b".to_owned(),
        ];
        let hooks = Webhooks::start(&urls, &keys, metrics.clone());
        assert!(hooks.is_on());
        for n in 0..QUEUE_CAPACITY {
            hooks.emit(event(n));
        }
        let full = r#"switchboard_webhook_dropped_total{reason="queue-full"}"#;
        assert_eq!(sample(&metrics, full), 0.0);
        for n in 0..5 {
            hooks.emit(event(n));
        }
        assert_eq!(
            sample(&metrics, full),
            10.0,
            "5 events dropped for each URL"
        );
        assert_eq!(hooks.queues.iter().map(|q| q.capacity()).sum::<usize>(), 0);
    }

    /// Without a key there is nothing to sign with: no queue, no task.
    #[tokio::test(flavor = "current_thread")]
    async fn without_a_key_nothing_is_queued() {
        let metrics = Arc::new(Metrics::new());
        let hooks = Webhooks::start(&["http://127.0.0.1:9/".into()], &Keys::default(), metrics);
        assert!(!hooks.is_on());
        hooks.emit(event(0));
    }
}
