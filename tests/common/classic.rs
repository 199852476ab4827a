//! A classic Socket.IO client at the Engine.IO frame level, speaking both
//! revisions (EIO=3 and EIO=4) over the WebSocket transport.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard::server::RunningServer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

/// A classic client at the Engine.IO frame level.
pub struct Raw {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub eio: u8,
    pub name: &'static str,
}

/// What a classic client can see.
#[derive(Debug, PartialEq)]
pub enum Seen {
    Event(String, Vec<Value>),
    Closed,
}

impl Raw {
    pub async fn connect(server: &RunningServer, eio: u8, name: &'static str) -> Raw {
        Raw::connect_to(&server.local_addr().to_string(), eio, name).await
    }

    /// Connects to `host:port`.
    pub async fn connect_to(addr: &str, eio: u8, name: &'static str) -> Raw {
        let url = format!("ws://{addr}/socket.io/?EIO={eio}&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("socket.io websocket connects");
        let mut raw = Raw { ws, eio, name };
        let open = raw.frame().await.expect("open packet");
        assert!(open.starts_with("0{"), "{name}: open packet, got {open}");
        if eio == 4 {
            raw.ws.send(Message::text("40")).await.expect("send");
        }
        // The namespace connect: EIO 3 servers send it unasked.
        let connect = raw.frame().await.expect("connect packet");
        assert!(connect.starts_with("40"), "{name}: connect, got {connect}");
        raw
    }

    /// The next Engine.IO text frame, answering pings on the way.
    pub async fn frame(&mut self) -> Option<String> {
        loop {
            let f = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: nothing within {WAIT:?}", self.name));
            match f {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    // EIO 4: the server pings, we pong.
                    self.ws.send(Message::text("3")).await.ok()?;
                }
                Some(Ok(Message::Text(t))) => return Some(t.to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(other)) => panic!("{}: unexpected frame {other:?}", self.name),
            }
        }
    }

    pub async fn next(&mut self) -> Seen {
        loop {
            let Some(f) = self.frame().await else {
                return Seen::Closed;
            };
            if let Some(body) = f.strip_prefix("42") {
                let v: Vec<Value> = serde_json::from_str(body).expect("event JSON");
                let name = v[0].as_str().expect("event name").to_owned();
                return Seen::Event(name, v[1..].to_vec());
            }
            if f == "3" {
                continue; // EIO 3: the pong to our ping
            }
            // A Socket.IO disconnect or an Engine.IO close.
            if f.starts_with("41") || f == "1" {
                return Seen::Closed;
            }
            panic!("{}: unexpected packet {f}", self.name);
        }
    }

    /// The next event, which must be `name`; returns its arguments.
    pub async fn expect(&mut self, name: &str) -> Vec<Value> {
        match self.next().await {
            Seen::Event(n, args) if n == name => args,
            other => panic!("{}: expected {name}, got {other:?}", self.name),
        }
    }

    pub async fn emit(&mut self, args: Value) {
        self.ws
            .send(Message::text(format!("42{args}")))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, frame: &str) -> bool {
        self.ws.send(Message::text(frame.to_owned())).await.is_ok()
    }

    /// Proves nothing is queued for this client: EIO 3 answers a ping with
    /// a pong, in order after anything already sent; EIO 4 has no
    /// client ping, so it waits a moment for anything stray.
    pub async fn expect_quiet(&mut self) {
        if self.eio == 3 {
            self.ws.send(Message::text("2")).await.expect("ping");
            let f = self.frame().await.expect("pong");
            assert_eq!(f, "3", "{}: something was pending: {f}", self.name);
        } else {
            let until = tokio::time::Instant::now() + Duration::from_millis(300);
            while let Ok(got) = tokio::time::timeout_at(until, self.ws.next()).await {
                match got {
                    Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                        self.ws.send(Message::text("3")).await.expect("pong");
                    }
                    other => panic!("{}: something was pending: {other:?}", self.name),
                }
            }
        }
    }
}
