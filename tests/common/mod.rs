//! Test harness: the real server in-process on 127.0.0.1:0 and real
//! WebSocket clients (tokio-tungstenite). Every frame a client receives is
//! validated against the protocol's JSON Schema before the test sees it.
#![allow(dead_code)]

pub mod aiortc;
pub mod classic;
pub mod media;

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::config::{Config, ServeOptions};
use switchboard::server::{start, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a message that must come.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn server(options: ServeOptions) -> RunningServer {
    let options = ServeOptions {
        listen: Some("127.0.0.1:0".parse().expect("address")),
        rtc_ip: Some("127.0.0.1".parse().expect("address")),
        rtc_port: Some(options.rtc_port.unwrap_or(0)),
        ..options
    };
    let config = Config::resolve(options).expect("valid test config");
    start(config).await.expect("server starts")
}

pub async fn default_server() -> RunningServer {
    server(ServeOptions::default()).await
}

fn server_validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(switchboard_proto::JSON_SCHEMA).expect("schema is JSON");
        jsonschema::validator_for(&json!({
            "$ref": "#/$defs/ServerMessage",
            "$defs": schema["$defs"].clone(),
        }))
        .expect("schema compiles")
    })
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub name: &'static str,
}

impl Client {
    pub async fn connect(server: &RunningServer, name: &'static str) -> Client {
        Client::connect_url(&server.ws_url(), name).await
    }

    pub async fn connect_url(url: &str, name: &'static str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Client { ws, name }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.name));
    }

    /// Sends a text frame; false once the connection is gone.
    pub async fn send_raw_ok(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next server message (schema-checked); panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Msg(v) => v,
            other => panic!("{}: expected a message, got {other:?}", self.name),
        }
    }

    /// The next message, close, or end of stream.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: nothing received within {WAIT:?}", self.name));
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("server sent non-JSON {t:?}: {e}"));
                    let errors: Vec<String> = server_validator()
                        .iter_errors(&v)
                        .map(|e| e.to_string())
                        .collect();
                    assert!(
                        errors.is_empty(),
                        "server frame {t} violates the schema: {errors:?}"
                    );
                    return Event::Msg(v);
                }
                Some(Ok(Message::Close(f))) => return Event::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("{}: unexpected frame {other:?}", self.name),
                Some(Err(e)) => return Event::Error(e.to_string()),
                None => return Event::End,
            }
        }
    }

    /// The next message, which must have `type`.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "{}: expected {ty}, got {v}", self.name);
        v
    }

    /// The next message must be an `error` with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{}: {v}", self.name);
        v
    }

    /// Proves nothing else is queued for this client: a ping's pong must be
    /// the very next message (the server delivers in order, so anything
    /// caused earlier would come first).
    pub async fn expect_nothing_pending(&mut self) {
        let id = rand_id();
        self.send(json!({"type":"ping","id": id})).await;
        let v = self.recv().await;
        assert_eq!(
            v,
            json!({"type":"pong","id": id}),
            "{}: something was pending",
            self.name
        );
    }

    /// Joins `room` with extra fields; returns `joined`.
    pub async fn join(&mut self, room: &str, extra: Value) -> Value {
        let mut msg = json!({"type":"join","room":room,"name":self.name});
        if let (Some(m), Some(e)) = (msg.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        self.send(msg).await;
        self.expect("joined").await
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_abruptly(self) {
        drop(self.ws);
    }
}

#[derive(Debug)]
pub enum Event {
    Msg(Value),
    Closed(Option<u16>),
    Error(String),
    End,
}

/// A port free on 127.0.0.1 for TCP and UDP right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The participant id in a `joined`.
pub fn id_of(joined: &Value) -> String {
    joined["id"].as_str().expect("joined has an id").to_owned()
}

/// GET `path` over plain HTTP/1.1; returns (status, body).
pub async fn http_get(server: &RunningServer, path: &str) -> (u16, String) {
    http_request(server, "GET", path, &[]).await
}

/// `method` `path` with extra header lines over plain HTTP/1.1; returns
/// (status, body).
pub async fn http_request(
    server: &RunningServer,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    let (status, _, body) = http_exchange(server, method, path, headers).await;
    (status, body)
}

/// The value of response header `name` (case-insensitive) of `GET path`, with
/// the status and body.
pub async fn http_get_header(
    server: &RunningServer,
    path: &str,
    name: &str,
) -> (u16, Option<String>, String) {
    let (status, head, body) = http_exchange(server, "GET", path, &[]).await;
    let value = head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    });
    (status, value, body)
}

/// One HTTP/1.1 request; returns (status, head, body).
async fn http_exchange(
    server: &RunningServer,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String, String) {
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n"
    );
    raw_http(server.local_addr(), &req).await
}

/// Sends one whole HTTP/1.1 request (`Connection: close`) to `addr` and
/// reads the answer: (status, head, body).
pub async fn raw_http(addr: std::net::SocketAddr, req: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

/// The value of one sample in the `/metrics` text, e.g.
/// `metric(&text, "switchboard_rooms")` or with labels
/// `metric(&text, "switchboard_signaling_errors_total{code=\"too-large\"}")`.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
        .trim()
        .parse()
        .expect("numeric sample")
}

pub async fn metrics(server: &RunningServer) -> String {
    let (status, body) = http_get(server, "/metrics").await;
    assert_eq!(status, 200);
    body
}
