//! ICE-TCP to the server (RFC 6544 framing) when the client is told to
//! use it instead of UDP.

use super::*;

pub(crate) struct TcpLink {
    pub(crate) reader: tokio::net::tcp::OwnedReadHalf,
    pub(crate) writer: tokio::net::tcp::OwnedWriteHalf,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) decoder: rtc::shared::tcp_framing::TcpFrameDecoder,
}

/// Reads from the ICE-TCP link; `None` when it closed. Never resolves
/// without a link.
pub(crate) async fn read_tcp(link: &mut Option<TcpLink>, buf: &mut [u8]) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    match link {
        Some(l) => match l.reader.read(buf).await {
            Ok(n) if n > 0 => Some(n),
            _ => None,
        },
        None => std::future::pending().await,
    }
}

impl Task {
    /// Connects to the server's passive TCP candidate from its answer.
    pub(crate) async fn connect_tcp(&mut self) {
        let Some(sdp) = self
            .pc
            .as_ref()
            .and_then(|pc| pc.remote_description())
            .map(|d| d.sdp.clone())
        else {
            return;
        };
        // a=candidate:<foundation> 1 tcp <prio> <ip> <port> typ host tcptype passive
        let target = sdp.lines().find_map(|l| {
            let f: Vec<&str> = l.strip_prefix("a=candidate:")?.split_whitespace().collect();
            let passive = f.get(2)?.eq_ignore_ascii_case("tcp")
                && f.windows(2).any(|w| w[0] == "tcptype" && w[1] == "passive");
            if !passive {
                return None;
            }
            format!("{}:{}", f.get(4)?, f.get(5)?)
                .parse::<SocketAddr>()
                .ok()
        });
        let Some(target) = target else { return };
        match tokio::net::TcpStream::connect(target).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let local = stream.local_addr().unwrap_or(target);
                let (reader, writer) = stream.into_split();
                self.tcp = Some(TcpLink {
                    reader,
                    writer,
                    local,
                    remote: target,
                    decoder: rtc::shared::tcp_framing::TcpFrameDecoder::new(),
                });
            }
            Err(e) => tracing::warn!(error = %e, %target, "ICE-TCP connect failed"),
        }
    }

    pub(crate) fn on_tcp_read(&mut self, n: Option<usize>, buf: &[u8]) {
        let Some(link) = self.tcp.as_mut() else {
            return;
        };
        let Some(n) = n else {
            self.tcp = None;
            return;
        };
        link.decoder.extend_from_slice(&buf[..n]);
        let (local, remote) = (link.local, link.remote);
        let mut packets = Vec::new();
        while let Some(p) = link.decoder.next_packet() {
            packets.push(p);
        }
        for p in packets {
            if !self.keep_incoming(&p) {
                continue;
            }
            if let Some(pc) = self.pc.as_mut() {
                let _ = pc.handle_read(TaggedBytesMut {
                    now: Instant::now(),
                    transport: TransportContext {
                        local_addr: local,
                        peer_addr: remote,
                        ecn: None,
                        transport_protocol: TransportProtocol::TCP,
                    },
                    message: BytesMut::from(&p[..]),
                });
            }
        }
    }
}
