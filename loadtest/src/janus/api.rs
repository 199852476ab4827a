//! Janus's WebSocket API (subprotocol `janus-protocol`): one connection and
//! one session per participant, as a browser running `janus.js` would have.
//!
//! Every request carries a `transaction`; Janus answers with `success` or
//! `error` (synchronous requests), or `ack` and later an `event` with the same
//! transaction (asynchronous plugin requests such as `join`, `configure`,
//! `start`). A reader task routes each answer to the request waiting for it;
//! messages without a transaction (`webrtcup`, `media`, `hangup`, plugin
//! notifications) go to [`Session::events`]. A keepalive goes out every
//! [`KEEPALIVE`], well inside Janus's 60 s session timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// How often the session is kept alive.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest wait for the answer to one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Janus API failures.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to Janus at {url}: {source}")]
    Connect {
        url: String,
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("timed out connecting to Janus at {0}")]
    ConnectTimeout(String),
    #[error("the Janus connection closed")]
    Closed,
    #[error("no answer from Janus to {0} within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    #[error("Janus refused {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("unexpected answer from Janus to {what}: {body}")]
    Unexpected { what: String, body: String },
}

/// Answers waiting for their transaction. `std::sync::Mutex`: never held
/// across an `.await`.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// One Janus session over its own WebSocket.
pub struct Session {
    id: u64,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next: AtomicU64,
    /// Messages without a transaction (webrtcup, media, hangup, plugin
    /// notifications), as Janus sent them.
    pub events: mpsc::UnboundedReceiver<Value>,
}

/// A handle attached to a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle(pub u64);

impl Session {
    /// Connects (within `limit`), creates a session and starts keepalives.
    pub async fn connect(url: &str, limit: Duration) -> Result<Session, ApiError> {
        let mut request = url
            .into_client_request()
            .map_err(|source| ApiError::Connect {
                url: url.to_owned(),
                source,
            })?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("janus-protocol"),
        );
        let (ws, _) = tokio::time::timeout(limit, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| ApiError::ConnectTimeout(url.to_owned()))?
            .map_err(|source| ApiError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let routes = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                route(&routes, &ev_tx, v);
            }
            // Dropping the senders wakes every waiting request with `Closed`.
            if let Ok(mut p) = routes.lock() {
                p.clear();
            }
        });
        let mut s = Session {
            id: 0,
            out: out_tx,
            pending,
            next: AtomicU64::new(1),
            events: ev_rx,
        };
        let created = s.call("create", json!({"janus": "create"})).await?;
        s.id = created
            .pointer("/data/id")
            .and_then(Value::as_u64)
            .ok_or_else(|| unexpected("create", &created))?;
        let out = s.out.clone();
        let id = s.id;
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                n += 1;
                let ka = json!({"janus": "keepalive", "session_id": id, "transaction": format!("ka{n}")});
                if out.send(Message::text(ka.to_string())).is_err() {
                    break;
                }
            }
        });
        Ok(s)
    }

    /// Sends `msg` with a fresh transaction and waits for its answer (the
    /// `event` after an `ack` for asynchronous requests).
    async fn call(&self, what: &str, mut msg: Value) -> Result<Value, ApiError> {
        let txn = format!("t{}", self.next.fetch_add(1, Ordering::Relaxed));
        msg["transaction"] = json!(txn);
        // `create` and `info` are outside any session.
        if self.id != 0 && what != "info" {
            msg["session_id"] = json!(self.id);
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(txn.clone(), tx);
        }
        self.out
            .send(Message::text(msg.to_string()))
            .map_err(|_| ApiError::Closed)?;
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => return Err(ApiError::Closed),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&txn);
                }
                return Err(ApiError::Timeout(what.to_owned()));
            }
        };
        if answer["janus"] == "error" {
            return Err(ApiError::Refused {
                what: what.to_owned(),
                reason: answer["error"]["reason"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_owned(),
            });
        }
        Ok(answer)
    }

    /// Janus's `info` (version, plugins, ...).
    pub async fn info(&self) -> Result<Value, ApiError> {
        self.call("info", json!({"janus": "info"})).await
    }

    /// Attaches a handle to `plugin` (e.g. `janus.plugin.videoroom`).
    pub async fn attach(&self, plugin: &str) -> Result<Handle, ApiError> {
        let a = self
            .call("attach", json!({"janus": "attach", "plugin": plugin}))
            .await?;
        a.pointer("/data/id")
            .and_then(Value::as_u64)
            .map(Handle)
            .ok_or_else(|| unexpected("attach", &a))
    }

    /// A plugin request (`body`), with a JSEP when given. Returns the
    /// plugin's data and the JSEP of the answer; a plugin-level error
    /// (`error_code`) is an error.
    pub async fn message(
        &self,
        handle: Handle,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<(Value, Option<Value>), ApiError> {
        let what = body["request"].as_str().unwrap_or("message").to_owned();
        let mut msg = json!({"janus": "message", "handle_id": handle.0, "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let mut answer = self.call(&what, msg).await?;
        let data = answer
            .pointer_mut("/plugindata/data")
            .map(Value::take)
            .ok_or_else(|| unexpected(&what, &answer))?;
        if data.get("error_code").is_some() {
            return Err(ApiError::Refused {
                what,
                reason: data["error"].as_str().unwrap_or("no reason").to_owned(),
            });
        }
        let jsep = answer.get_mut("jsep").map(Value::take);
        Ok((data, jsep))
    }

    /// Tells Janus no more candidates will come (they are all in the SDP).
    pub fn trickle_completed(&self, handle: Handle) {
        let msg = json!({
            "janus": "trickle",
            "session_id": self.id,
            "handle_id": handle.0,
            "transaction": format!("tc{}", self.next.fetch_add(1, Ordering::Relaxed)),
            "candidate": {"completed": true},
        });
        let _ = self.out.send(Message::text(msg.to_string()));
    }

    /// Destroys the session (best effort) and closes the WebSocket.
    pub fn close(&self) {
        let msg = json!({"janus": "destroy", "session_id": self.id, "transaction": "bye"});
        let _ = self.out.send(Message::text(msg.to_string()));
        let _ = self.out.send(Message::Close(None));
    }
}

fn unexpected(what: &str, body: &Value) -> ApiError {
    ApiError::Unexpected {
        what: what.to_owned(),
        body: body.to_string(),
    }
}

/// Routes one message from Janus: an `ack` is only a receipt (the `event`
/// follows), except for keepalives and trickles, whose answer it is.
fn route(pending: &Pending, events: &mpsc::UnboundedSender<Value>, v: Value) {
    let kind = v["janus"].as_str().unwrap_or_default();
    match v.get("transaction").and_then(Value::as_str) {
        Some(_) if kind == "ack" => {}
        Some(txn) => {
            let waiter = pending.lock().ok().and_then(|mut p| p.remove(txn));
            match waiter {
                Some(w) => {
                    let _ = w.send(v);
                }
                None => {
                    let _ = events.send(v);
                }
            }
        }
        None => {
            let _ = events.send(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answers_by_transaction_and_the_rest_as_events() {
        let pending: Pending = Arc::default();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let (tx, mut rx) = oneshot::channel();
        pending
            .lock()
            .expect("not poisoned")
            .insert("t1".into(), tx);
        route(
            &pending,
            &ev_tx,
            json!({"janus": "ack", "transaction": "t1"}),
        );
        assert!(rx.try_recv().is_err(), "an ack is not the answer");
        route(
            &pending,
            &ev_tx,
            json!({"janus": "webrtcup", "sender": 5, "session_id": 1}),
        );
        route(
            &pending,
            &ev_tx,
            json!({"janus": "event", "transaction": "t1", "plugindata": {"data": {"videoroom": "joined"}}}),
        );
        let answer = rx.try_recv().expect("answered");
        assert_eq!(answer["plugindata"]["data"]["videoroom"], "joined");
        assert_eq!(ev_rx.try_recv().expect("event")["janus"], "webrtcup");
        assert!(pending.lock().expect("not poisoned").is_empty());
    }
}
