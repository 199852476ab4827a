//! The HTTP edge: routes, TLS, and graceful shutdown.
//!
//! Routes: `/` (the browser client, embedded: `index.html`, its ES modules
//! `/app.js`... listed in [`SCRIPTS`], `/style.css`),
//! `/ws` (signaling), `/healthz`, `/readyz`, `/api/v1` (the admin API), and
//! `/metrics` and `/admin/drain` — on the public listener, or with
//! `--metrics-listen` on that one only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use axum_server::tls_rustls::RustlsConfig;

use crate::perip::PerIp;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{Config, Tls};
use crate::hub::{Hub, Outboxes};
use crate::metrics::Metrics;
use crate::sfu::{Command, MediaPlane, Publishing};
use crate::webhook::Webhooks;

/// Failures starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("--redis-url: {0}")]
    Redis(String),
}

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    /// Cluster mode (`--redis-url`).
    cluster: Option<Arc<Cluster>>,
    metrics: Arc<Metrics>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
    /// WebSocket connections per client address (`--max-conns-per-ip`).
    ws_per_ip: Arc<PerIp>,
}

/// A server that is accepting connections.
pub struct RunningServer {
    addr: SocketAddr,
    tls: bool,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    hub: Arc<Hub>,
    cluster: Option<Arc<Cluster>>,
    media: Option<MediaPlane>,
    metrics_addr: Option<SocketAddr>,
}

impl RunningServer {
    /// The address of the `--metrics-listen` listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address it listens on (the real port when the config said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `ws://` or `wss://` URL of signaling.
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/ws", self.addr)
    }

    /// The `http://` or `https://` base URL.
    pub fn http_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The UDP address of the media plane, if it runs.
    pub fn media_addr(&self) -> Option<SocketAddr> {
        self.media.as_ref().map(MediaPlane::local_addr)
    }

    /// The room registry, for inspection.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// A handle that can drain or shut down the server from another task.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            hub: self.hub.clone(),
            cluster: self.cluster.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Starts a drain: `/readyz` turns 503 and new joins are refused at once;
    /// rooms go on until they are empty or `--drain-timeout-ms` passes, then
    /// the server shuts down as [`RunningServer::shutdown`] does.
    pub fn drain(&self) {
        start_drain(&self.hub, self.cluster.as_deref(), &self.shutdown);
    }

    /// Whether a drain or shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.hub.is_draining() || self.shutdown.is_cancelled()
    }

    /// Starts a graceful shutdown: every client gets `error` `room-closed`,
    /// then its socket closes.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that starts the shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Http(std::io::Error::other(e))),
        }
    }
}

/// Drains or shuts down a running server (e.g. from a signal handler).
#[derive(Clone)]
pub struct ServerHandle {
    hub: Arc<Hub>,
    cluster: Option<Arc<Cluster>>,
    shutdown: CancellationToken,
}

impl ServerHandle {
    /// See [`RunningServer::drain`].
    pub fn drain(&self) {
        start_drain(&self.hub, self.cluster.as_deref(), &self.shutdown);
    }

    /// See [`RunningServer::shutdown`].
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// Binds and starts serving `config` on the current tokio runtime.
pub async fn start(config: Config) -> Result<RunningServer, ServeError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let outboxes = Arc::new(Outboxes::default());
    let publishing = Arc::new(Publishing::default());
    let webhooks = Arc::new(Webhooks::start(
        &config.webhook_urls,
        &config.keys,
        metrics.clone(),
    ));
    let media = match &config.media {
        Some(media) => Some(
            crate::transport::start(
                media.clone(),
                outboxes.clone(),
                metrics.clone(),
                publishing.clone(),
                webhooks.clone(),
            )
            .map_err(|source| ServeError::Bind {
                addr: media.bind,
                source,
            })?,
        ),
        None => None,
    };
    let hub = Arc::new(Hub::new(
        config.clone(),
        metrics.clone(),
        outboxes,
        media.clone(),
        publishing,
        webhooks,
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(housekeeping(Arc::downgrade(&hub), shutdown.clone()));
    let cluster = match &config.cluster {
        Some(c) => {
            let media_addr = config.media.as_ref().map(|m| {
                std::net::SocketAddr::new(m.public_ip.unwrap_or(m.bind.ip()), m.bind.port())
                    .to_string()
            });
            Some(
                Cluster::start(
                    c,
                    hub.clone(),
                    metrics.clone(),
                    media_addr,
                    shutdown.clone(),
                )
                .map_err(|e| ServeError::Redis(e.to_string()))?,
            )
        }
        None => None,
    };
    let sessions = TaskTracker::new();
    let state = AppState {
        hub: hub.clone(),
        cluster: cluster.clone(),
        metrics,
        sessions: sessions.clone(),
        shutdown: shutdown.clone(),
        ws_per_ip: Arc::new(PerIp::new(config.limits.max_conns_per_ip, "websocket")),
    };
    let (metrics_addr, metrics_server) = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            let app = ops_router(state.clone());
            let stop = shutdown.clone();
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            });
            tracing::info!(addr = %local, "metrics and admin listening");
            (Some(local), Some(task))
        }
        None => (None, None),
    };
    let app =
        router(state, metrics_addr.is_none()).into_make_service_with_connect_info::<SocketAddr>();

    let listener =
        std::net::TcpListener::bind(config.listen).map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let bind_err = |source| ServeError::Bind {
        addr: config.listen,
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let handle = axum_server::Handle::new();
    let _ = metrics_server;
    let rustls = tls_config(&config).await?;
    let tls = rustls.is_some();

    let serve_handle = handle.clone();
    let header_timeout = config.http_header_timeout;
    let http = async move {
        match rustls {
            // TCP_NODELAY: small signaling frames must not wait for delayed
            // ACKs (measured: 40 ms pong tails without it).
            Some(rc) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rc)
                    .acceptor(axum_server::accept::NoDelayAcceptor::new());
                let mut server = axum_server::from_tcp(listener)
                    .map_err(ServeError::Http)?
                    .http1_only();
                limit_header_time(&mut server, header_timeout);
                server
                    .acceptor(acceptor)
                    .handle(serve_handle)
                    .serve(app)
                    .await
            }
            None => {
                let mut server = axum_server::from_tcp(listener)
                    .map_err(ServeError::Http)?
                    .http1_only();
                limit_header_time(&mut server, header_timeout);
                server
                    .acceptor(axum_server::accept::NoDelayAcceptor::new())
                    .handle(serve_handle)
                    .serve(app)
                    .await
            }
        }
        .map_err(ServeError::Http)
    };
    let grace = config.shutdown_grace;
    let stop = shutdown.clone();
    let media_stop = media.clone();
    let task = tokio::spawn(async move {
        let http = tokio::spawn(http);
        stop.cancelled().await;
        tracing::info!("shutting down: closing every connection");
        // Stop accepting; sessions see the same token and say `room-closed`.
        handle.graceful_shutdown(Some(grace));
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!(?grace, "some connections did not close in time");
        }
        if let Some(media) = &media_stop {
            let _ = media.send(Command::Shutdown);
        }
        match tokio::time::timeout(Duration::from_secs(1), http).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ServeError::Http(std::io::Error::other(e))),
            Err(_) => Ok(()),
        }
    });
    tracing::info!(%addr, tls, "listening");
    Ok(RunningServer {
        addr,
        tls,
        shutdown,
        task,
        hub,
        cluster,
        media,
        metrics_addr,
    })
}

/// The routes of `--metrics-listen`: metrics, admin, health.
fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/drain", axum::routing::post(admin_drain))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The public routes; `with_ops` adds `/metrics` and `/admin/*` (when there
/// is no separate listener for them).
fn router(state: AppState, with_ops: bool) -> Router {
    let api = crate::admin::router(state.hub.clone());
    let public = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ws", get(ws));
    let public = SCRIPTS.iter().fold(public, |router, &(path, body)| {
        router.route(
            path,
            get(move || async move { asset("text/javascript; charset=utf-8", body) }),
        )
    });
    let public = if with_ops {
        public
            .route("/admin/drain", axum::routing::post(admin_drain))
            .route("/metrics", get(metrics))
    } else {
        public
    };
    let classic = crate::socketio::layer(crate::socketio::Shared {
        hub: state.hub.clone(),
        shutdown: state.shutdown.clone(),
        sessions: state.sessions.clone(),
        per_ip: state.ws_per_ip.clone(),
        cluster: state.cluster.clone(),
    });
    let origins = Arc::new(state.hub.config().allowed_origins.clone());
    public
        .with_state(state)
        .merge(api)
        .layer(classic)
        .layer(axum::middleware::from_fn(move |req, next| {
            crate::socketio::cors(origins.clone(), req, next)
        }))
}

const INDEX_HTML: &str = include_str!("web/index.html");
/// The browser client's ES modules, served as they are (no bundler): `/app.js`
/// is the entry point `index.html` loads; it imports the others by relative path.
const SCRIPTS: &[(&str, &str)] = &[
    ("/app.js", include_str!("web/app.js")),
    ("/state.js", include_str!("web/state.js")),
    ("/notices.js", include_str!("web/notices.js")),
    ("/view.js", include_str!("web/view.js")),
    ("/media.js", include_str!("web/media.js")),
    ("/socket.js", include_str!("web/socket.js")),
    ("/protocol.js", include_str!("web/protocol.js")),
    ("/session.js", include_str!("web/session.js")),
    ("/p2p.js", include_str!("web/p2p.js")),
    ("/switch.js", include_str!("web/switch.js")),
    ("/sfu.js", include_str!("web/sfu.js")),
    ("/layers.js", include_str!("web/layers.js")),
    ("/chat.js", include_str!("web/chat.js")),
    ("/stats.js", include_str!("web/stats.js")),
    ("/testhooks.js", include_str!("web/testhooks.js")),
    ("/token.js", include_str!("web/token.js")),
];
const STYLE_CSS: &str = include_str!("web/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn healthz(State(s): State<AppState>) -> Response {
    if s.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

/// Ready for new participants: 503 from the moment a drain starts.
async fn readyz(State(s): State<AppState>) -> Response {
    if s.shutdown.is_cancelled() || s.hub.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if s.cluster.as_ref().is_some_and(|c| !c.is_ready()) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the room directory (Redis) is unreachable\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

/// `POST /admin/drain` with `Authorization: Bearer <--admin-token>`.
async fn admin_drain(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = s.hub.config().admin_token.as_deref() else {
        return (
            StatusCode::NOT_FOUND,
            "the admin endpoint is off (no --admin-token)\n",
        )
            .into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "bad or missing admin token\n").into_response();
    }
    start_drain(&s.hub, s.cluster.as_deref(), &s.shutdown);
    (StatusCode::ACCEPTED, "draining\n").into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every 100 ms until shutdown or the hub is gone: rooms whose wait to
/// return to `p2p` is over (`--p2p-return-ms`), and empty rooms whose empty
/// timeout is over.
async fn housekeeping(hub: std::sync::Weak<Hub>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(hub) = hub.upgrade() else { return };
        let now = std::time::Instant::now();
        hub.run_due_returns(now);
        hub.run_due_frees(now);
        hub.run_due_resumes(now);
    }
}

/// Starts a drain (once): no new joins, `/readyz` 503; the shutdown follows
/// when the last participant leaves or the drain timeout passes.
fn start_drain(hub: &Arc<Hub>, cluster: Option<&Cluster>, shutdown: &CancellationToken) {
    if hub.is_draining() || shutdown.is_cancelled() {
        return;
    }
    // Other nodes stop placing rooms here first.
    if let Some(cluster) = cluster {
        cluster.start_draining();
    }
    hub.start_draining();
    let timeout = hub.config().drain_timeout;
    tracing::info!(?timeout, participants = hub.participant_count(), "draining");
    let (hub, shutdown) = (hub.clone(), shutdown.clone());
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if hub.participant_count() == 0 {
                tracing::info!("drained: no participants left");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(
                    participants = hub.participant_count(),
                    "drain timeout; closing the rooms"
                );
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        shutdown.cancel();
    });
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// The last address in `X-Forwarded-For` (the one the nearest proxy added),
/// if it parses.
pub(crate) fn forwarded_for(headers: &HeaderMap) -> Option<std::net::IpAddr> {
    let last = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|v| !v.is_empty())?;
    last.parse().ok()
}

/// Most bytes a WebSocket may have written but not yet accepted by the
/// client's TCP window before the connection is failed.
const WRITE_BUFFER_CAP: usize = 512 * 1024;

async fn ws(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let allowed = &s.hub.config().allowed_origins;
    if !allowed.is_empty() {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            tracing::info!(%peer, origin, "refused a WebSocket from a foreign origin");
            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
        }
    }
    if s.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    // Behind a reverse proxy every TCP peer is the proxy: count the client
    // it names, when told to trust it.
    let peer = if s.hub.config().trust_forwarded_for {
        forwarded_for(&headers).map_or(peer, |ip| SocketAddr::new(ip, peer.port()))
    } else {
        peer
    };
    let Some(slot) = s.ws_per_ip.acquire(peer.ip()) else {
        s.metrics.limited(crate::metrics::Limit::ConnsPerIp);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from your address\n",
        )
            .into_response();
    };
    // Frames over the limit get `too-large` and the connection lives on; only
    // frames over four times the limit (which we refuse to buffer) close it.
    let hard_cap = s.hub.config().limits.max_frame_bytes.saturating_mul(4);
    let sessions = s.sessions.clone();
    // tungstenite's default 128 KiB read buffer would dominate per-connection
    // memory (measured: 138 KiB -> 14 KiB per connection with 8 KiB).
    upgrade
        .read_buffer_size(8 * 1024)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        // Writes go out at once; what the client does not read piles up
        // here only up to the cap (one largest frame plus room for pongs),
        // then the connection fails instead of growing (measured without a
        // cap: 1.17 GB in 5 s of unread pongs).
        .write_buffer_size(0)
        .max_write_buffer_size(WRITE_BUFFER_CAP.max(hard_cap + 64 * 1024))
        .on_upgrade(move |socket| {
            let session = crate::session::run(
                socket,
                s.hub.clone(),
                s.cluster.clone(),
                peer,
                s.shutdown.clone(),
            );
            sessions.track_future(async move {
                // The address's slot is held for as long as the session runs.
                let _slot = slot;
                session.await
            })
        })
}

/// Closes connections that do not send their request headers within
/// `limit` (slowloris: without it a connection that sends a byte now and
/// then, or nothing, stays open for good). HTTP/1 only: browsers speak it to
/// us for the page and the WebSocket alike, and HTTP/1 has no version sniff
/// before the timeout starts.
fn limit_header_time<A>(server: &mut axum_server::Server<SocketAddr, A>, limit: Duration) {
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limit);
}

async fn tls_config(config: &Config) -> Result<Option<RustlsConfig>, ServeError> {
    // Either provider works; pick ring explicitly so the process has exactly one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match &config.tls {
        Tls::Off => Ok(None),
        Tls::Files { cert, key } => RustlsConfig::from_pem_file(cert, key)
            .await
            .map(Some)
            .map_err(|e| ServeError::Tls(format!("{} / {}: {e}", cert.display(), key.display()))),
        Tls::SelfSigned { extra_names } => {
            let mut names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            if !config.listen.ip().is_unspecified() {
                names.push(config.listen.ip().to_string());
            }
            names.extend(extra_names.iter().cloned());
            names.dedup();
            let cert = rcgen::generate_simple_self_signed(names.clone())
                .map_err(|e| ServeError::Tls(format!("generating a certificate: {e}")))?;
            tracing::warn!(
                ?names,
                "serving HTTPS with a self-signed certificate (for development only)"
            );
            RustlsConfig::from_pem(
                cert.cert.pem().into_bytes(),
                cert.signing_key.serialize_pem().into_bytes(),
            )
            .await
            .map(Some)
            .map_err(|e| ServeError::Tls(e.to_string()))
        }
    }
}
