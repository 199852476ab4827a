//! Webhooks against the real server on 127.0.0.1:0, received by a plain
//! HTTP/1.1 receiver in the test (also on loopback): the events of a room's
//! lifecycle in order with their documented fields, every signature checked
//! by LiveKit's own `WebhookReceiver` (PyPI `livekit-api`), retries that keep
//! the order and never deliver twice, and dead receivers that cost joins
//! nothing while their bounded queues drop (and count) what does not fit.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::auth::{sign_with, unix_now, Claims, VideoGrant};
use switchboard::config::{Config, ServeOptions};
use switchboard::server::RunningServer;
use switchboard::webhook::QUEUE_CAPACITY;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const KEY: &str = "hook-key";
const SECRET: &str = "0123456789abcdef0123456789abcdef-hook";

fn keyed(webhook_urls: Vec<String>) -> ServeOptions {
    ServeOptions {
        api_key: Some(KEY.into()),
        api_secret: Some(SECRET.into()),
        webhook_url: (!webhook_urls.is_empty()).then_some(webhook_urls),
        // Signaling is all these tests need.
        media: Some(false),
        ..Default::default()
    }
}

fn join_token(room: &str, identity: &str) -> String {
    let now = unix_now();
    let claims = Claims {
        iss: KEY.into(),
        sub: identity.into(),
        name: Some(format!("{identity} (display)")),
        nbf: Some(now - 5),
        exp: now + 600,
        video: VideoGrant {
            room: Some(room.into()),
            room_join: true,
            ..Default::default()
        },
        ..Default::default()
    };
    sign_with(SECRET, &claims).expect("signs")
}

// -- the receiver -------------------------------------------------------------

/// What the receiver does with its `n`th request (from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Answers with this status and closes.
    Status(u16),
    /// Closes the connection without a word.
    Drop,
    /// Keeps the connection open and never answers.
    Never,
}

/// One request the receiver read, and what it answered.
#[derive(Debug, Clone)]
struct Delivery {
    method: String,
    path: String,
    content_type: Option<String>,
    authorization: Option<String>,
    body: String,
    answer: Answer,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {}", self.body))
    }

    fn acked(&self) -> bool {
        matches!(self.answer, Answer::Status(s) if (200..300).contains(&s))
    }
}

struct Receiver {
    url: String,
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Receiver {
    /// A receiver on 127.0.0.1:0 answering its `n`th request per `plan`.
    async fn start(plan: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let (tx, rx) = mpsc::unbounded_channel();
        let plan = Arc::new(plan);
        let count = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, plan, count) = (tx.clone(), plan.clone(), count.clone());
                tokio::spawn(async move {
                    serve_one(stream, tx, &*plan, &count).await;
                });
            }
        });
        Receiver { url, rx }
    }

    /// The next request; panics if none comes within [`WAIT`].
    async fn next(&mut self) -> Delivery {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no webhook request within {WAIT:?}"))
            .expect("receiver runs")
    }

    /// Reads requests until `n` of them were answered 2xx; returns every
    /// request read, in order. At most `n + extra` requests are read.
    async fn until_acked(&mut self, n: usize, extra: usize) -> Vec<Delivery> {
        let mut all = Vec::new();
        while all.iter().filter(|d: &&Delivery| d.acked()).count() < n {
            assert!(
                all.len() < n + extra,
                "more requests than expected before {n} were acknowledged: {all:#?}"
            );
            all.push(self.next().await);
        }
        all
    }
}

/// Reads one request from `stream` and answers it per `plan`.
async fn serve_one(
    mut stream: TcpStream,
    tx: mpsc::UnboundedSender<Delivery>,
    plan: &(dyn Fn(usize) -> Answer + Send + Sync),
    count: &AtomicUsize,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut start = lines.next().unwrap_or_default().split(' ');
    let method = start.next().unwrap_or_default().to_owned();
    let path = start.next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let answer = plan(count.fetch_add(1, Ordering::SeqCst));
    let delivery = Delivery {
        method,
        path,
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: String::from_utf8(buf[head_end..head_end + length].to_vec()).expect("UTF-8 body"),
        answer,
    };
    // Reported before the answer goes out: the server cannot have sent its
    // next request before the test hears of this one.
    let _ = tx.send(delivery);
    match answer {
        Answer::Status(code) => {
            let resp =
                format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Answer::Drop => drop(stream),
        Answer::Never => {
            // Hold the connection open until the runtime ends.
            std::future::pending::<()>().await;
        }
    }
}

// -- driving the server -------------------------------------------------------

/// alice joins `room`, bob joins, bob leaves, alice leaves; returns their
/// participant ids. Each step is acknowledged before the next starts.
async fn lifecycle(server: &RunningServer, room: &str) -> (String, String) {
    let mut a = Client::connect(server, "alice").await;
    let ja = a
        .join(room, json!({"token": join_token(room, "alice")}))
        .await;
    let mut b = Client::connect(server, "bob").await;
    let jb = b
        .join(room, json!({"token": join_token(room, "bob")}))
        .await;
    a.expect("otherjoin").await;
    b.send(json!({"type":"leave","room":room})).await;
    b.expect("leaved").await;
    a.expect("bye").await;
    a.send(json!({"type":"leave","room":room})).await;
    a.expect("leaved").await;
    (id_of(&ja), id_of(&jb))
}

/// One participant joins `room` and leaves it.
async fn solo(c: &mut Client, room: &str) {
    c.join(room, json!({"token": join_token(room, c.name)}))
        .await;
    c.send(json!({"type":"leave","room":room})).await;
    c.expect("leaved").await;
}

/// The `(event, room, participant identity)` of each body.
fn summary(bodies: &[Value]) -> Vec<(String, String, Option<String>)> {
    bodies
        .iter()
        .map(|b| {
            (
                b["event"].as_str().unwrap_or_default().to_owned(),
                b["room"]["name"].as_str().unwrap_or_default().to_owned(),
                b["participant"]["identity"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn lifecycle_events(room: &str) -> Vec<(String, String, Option<String>)> {
    [
        ("room_started", None),
        ("participant_joined", Some("alice")),
        ("participant_joined", Some("bob")),
        ("participant_left", Some("bob")),
        ("participant_left", Some("alice")),
        ("room_finished", None),
    ]
    .into_iter()
    .map(|(e, who)| (e.to_owned(), room.to_owned(), who.map(str::to_owned)))
    .collect()
}

/// Proves `rx` holds nothing more from before: a fresh room's `room_started`
/// must be the very next request (delivery to a URL is in order).
async fn expect_nothing_pending(server: &RunningServer, rx: &mut Receiver) {
    let room = format!("sentinel-{}", rand_id());
    let mut c = Client::connect(server, "sentinel").await;
    solo(&mut c, &room).await;
    let next = rx.next().await.json();
    assert_eq!(
        (next["event"].as_str(), next["room"]["name"].as_str()),
        (Some("room_started"), Some(room.as_str())),
        "an unexpected event was pending: {next}"
    );
}

/// Polls `/metrics` until `sample` reaches at least `want` (bounded by
/// [`WAIT`]); returns the whole text then.
async fn metrics_when(server: &RunningServer, sample: &str, want: f64) -> String {
    let end = Instant::now() + WAIT;
    loop {
        let m = metrics(server).await;
        if metric(&m, sample) >= want {
            return m;
        }
        assert!(
            Instant::now() < end,
            "{sample} stayed below {want} for {WAIT:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const DELIVERED: &str = "switchboard_webhook_delivered_total";
const FAILED: &str = "switchboard_webhook_failed_attempts_total";
const QUEUE_FULL: &str = "switchboard_webhook_dropped_total{reason=\"queue-full\"}";
const GAVE_UP: &str = "switchboard_webhook_dropped_total{reason=\"gave-up\"}";

// -- LiveKit's verifier -------------------------------------------------------

/// Runs every `(body, Authorization)` through LiveKit's
/// `WebhookReceiver(TokenVerifier(KEY, SECRET)).receive` in one Python
/// process; returns, per pair, `Ok(parsed event as JSON)` or `Err(message)`.
fn livekit_verify(pairs: &[(String, String)]) -> Vec<Result<Value, String>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("hooks.json");
    let list: Vec<Value> = pairs
        .iter()
        .map(|(body, auth)| json!({"body": body, "auth": auth}))
        .collect();
    std::fs::write(&input, serde_json::to_vec(&list).expect("json")).expect("write");
    let script = format!(
        "import json, sys\n\
         from google.protobuf.json_format import MessageToDict\n\
         from livekit import api\n\
         receiver = api.WebhookReceiver(api.TokenVerifier({KEY:?}, {SECRET:?}))\n\
         out = []\n\
         for h in json.load(open(sys.argv[1])):\n\
         \x20   try:\n\
         \x20       ev = receiver.receive(h['body'], h['auth'])\n\
         \x20       out.append({{'ok': MessageToDict(ev)}})\n\
         \x20   except Exception as e:\n\
         \x20       out.append({{'err': repr(e)}})\n\
         print(json.dumps(out))\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .arg(&input)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "LiveKit's SDK is needed (pip install -r tests/aiortc/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    assert_eq!(results.len(), pairs.len());
    results
        .into_iter()
        .map(|r| match (r.get("ok"), r.get("err")) {
            (Some(ev), _) => Ok(ev.clone()),
            (_, Some(e)) => Err(e.as_str().unwrap_or_default().to_owned()),
            _ => panic!("bad python output {r}"),
        })
        .collect()
}

// -- the tests ----------------------------------------------------------------

#[tokio::test]
async fn a_rooms_lifecycle_arrives_in_order_with_the_documented_fields() {
    let t0 = Instant::now();
    let mut rx = Receiver::start(|_| Answer::Status(200)).await;
    let server = server(keyed(vec![rx.url.clone()])).await;
    let before = unix_now();
    let (alice, bob) = lifecycle(&server, "lobby").await;
    let got = rx.until_acked(6, 0).await;
    let after = unix_now();
    let bodies: Vec<Value> = got.iter().map(Delivery::json).collect();
    assert_eq!(summary(&bodies), lifecycle_events("lobby"), "{bodies:#?}");

    let mut ids = HashSet::new();
    for (d, b) in got.iter().zip(&bodies) {
        assert_eq!(d.method, "POST");
        assert_eq!(d.path, "/hook");
        assert_eq!(
            d.content_type.as_deref(),
            Some("application/webhook+json"),
            "{d:?}"
        );
        let auth = d.authorization.as_deref().expect("Authorization header");
        assert_eq!(auth.split('.').count(), 3, "a bare JWT, no Bearer: {auth}");
        let id = b["id"].as_str().expect("id is a string");
        assert!(!id.is_empty());
        assert!(ids.insert(id.to_owned()), "id {id} is not unique");
        let created = b["createdAt"].as_u64().expect("createdAt is unix seconds");
        assert!((before..=after).contains(&created), "createdAt {created}");
        assert_eq!(b["room"]["name"], "lobby");
        assert_eq!(b["room"]["mode"], "p2p", "{b}");
        assert!(b["room"]["audio"].is_string(), "{b}");
        assert!(b.get("track").is_none(), "{b}");
        let keys: HashSet<&str> = b
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let want: HashSet<&str> = if b.get("participant").is_some() {
            HashSet::from(["event", "id", "createdAt", "room", "participant"])
        } else {
            HashSet::from(["event", "id", "createdAt", "room"])
        };
        assert_eq!(keys, want, "{b}");
    }
    for (b, (id, identity)) in bodies[1..5].iter().zip([
        (&alice, "alice"),
        (&bob, "bob"),
        (&bob, "bob"),
        (&alice, "alice"),
    ]) {
        assert_eq!(
            b["participant"],
            json!({"id": id, "identity": identity, "name": format!("{identity} (display)")}),
            "{b}"
        );
    }
    // Nothing else (no mode change, no duplicate) was sent for the room.
    expect_nothing_pending(&server, &mut rx).await;
    let m = metrics_when(&server, DELIVERED, 7.0).await;
    assert_eq!(metric(&m, DELIVERED), 7.0);
    assert_eq!(metric(&m, FAILED), 0.0);
    println!("lifecycle test took {:?}", t0.elapsed());
}

#[tokio::test]
async fn every_signature_verifies_with_livekits_webhook_receiver_and_a_tampered_body_does_not() {
    // Two URLs (the flag repeats): each gets every event, byte for byte.
    let mut rx1 = Receiver::start(|_| Answer::Status(200)).await;
    let mut rx2 = Receiver::start(|_| Answer::Status(204)).await;
    let server = server(keyed(vec![rx1.url.clone(), rx2.url.clone()])).await;
    lifecycle(&server, "signed").await;
    let got1 = rx1.until_acked(6, 0).await;
    let got2 = rx2.until_acked(6, 0).await;
    let bodies1: Vec<&str> = got1.iter().map(|d| d.body.as_str()).collect();
    let bodies2: Vec<&str> = got2.iter().map(|d| d.body.as_str()).collect();
    assert_eq!(bodies1, bodies2, "both URLs get the same events, same ids");

    let mut pairs: Vec<(String, String)> = got1
        .iter()
        .chain(&got2)
        .map(|d| {
            (
                d.body.clone(),
                d.authorization.clone().expect("Authorization header"),
            )
        })
        .collect();
    let genuine = pairs.len();
    // One byte changed in each body (the room name's first letter), the
    // signature kept: LiveKit must refuse every one.
    for i in 0..genuine {
        let (body, auth) = pairs[i].clone();
        let tampered = body.replacen("\"signed\"", "\"tigned\"", 1);
        assert_eq!(tampered.len(), body.len());
        assert_ne!(tampered, body);
        pairs.push((tampered, auth));
    }
    // And a genuine body under another event's signature.
    pairs.push((pairs[0].0.clone(), pairs[1].1.clone()));

    let results = livekit_verify(&pairs);
    let expected = lifecycle_events("signed");
    for (i, r) in results[..genuine].iter().enumerate() {
        let ev = r
            .as_ref()
            .unwrap_or_else(|e| panic!("LiveKit refused webhook {i}: {e}\n{}", pairs[i].0));
        // LiveKit parses our body into its WebhookEvent.
        let want = &expected[i % expected.len()];
        assert_eq!(ev["event"], want.0.as_str(), "{ev}");
        assert_eq!(ev["room"]["name"], want.1.as_str(), "{ev}");
        assert_eq!(
            ev["participant"]["identity"].as_str(),
            want.2.as_deref(),
            "{ev}"
        );
        let body: Value = serde_json::from_str(&pairs[i].0).expect("json");
        assert_eq!(ev["id"], body["id"], "{ev}");
    }
    for (i, r) in results[genuine..].iter().enumerate() {
        let e = r.as_ref().err().unwrap_or_else(|| {
            panic!(
                "LiveKit accepted a forged webhook {i}: {}",
                pairs[genuine + i].0
            )
        });
        assert!(e.contains("hash mismatch"), "{e}");
    }
}

#[tokio::test]
async fn failed_posts_are_retried_in_order_and_nothing_acknowledged_comes_twice() {
    let t0 = Instant::now();
    // 500, a dropped connection, 503; then 200 for everything.
    let plan = |n| match n {
        0 => Answer::Status(500),
        1 => Answer::Drop,
        2 => Answer::Status(503),
        _ => Answer::Status(200),
    };
    let mut rx = Receiver::start(plan).await;
    let server = server(keyed(vec![rx.url.clone()])).await;
    lifecycle(&server, "retry").await;
    let got = rx.until_acked(6, 3).await;
    assert_eq!(got.len(), 9, "three failures, six deliveries: {got:#?}");
    // The first event is tried until it goes through, before any other is sent:
    // the same bytes four times.
    for d in &got[1..4] {
        assert_eq!(d.body, got[0].body, "a retry resends the same event");
    }
    assert!(got[..3].iter().all(|d| !d.acked()) && got[3].acked());

    let acked: Vec<Value> = got
        .iter()
        .filter(|d| d.acked())
        .map(Delivery::json)
        .collect();
    assert_eq!(summary(&acked), lifecycle_events("retry"));
    let ids: HashSet<&str> = acked.iter().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "ids unique among the acknowledged");
    // No acknowledged event comes again later.
    expect_nothing_pending(&server, &mut rx).await;

    let m = metrics_when(&server, DELIVERED, 7.0).await;
    assert_eq!(metric(&m, DELIVERED), 7.0);
    assert_eq!(metric(&m, FAILED), 3.0);
    assert_eq!(metric(&m, QUEUE_FULL), 0.0);
    assert_eq!(metric(&m, GAVE_UP), 0.0);
    println!(
        "retry test took {:?} (backoff 0.5 s + 1 s + 2 s)",
        t0.elapsed()
    );
}

/// 20 sequential join/leave cycles on one connection; returns each join's
/// latency (join sent → `joined` read).
async fn join_latencies(server: &RunningServer, rounds: usize) -> Vec<Duration> {
    let mut c = Client::connect(server, "timer").await;
    let mut out = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let room = format!("timed-{i}");
        let t = Instant::now();
        c.join(&room, json!({"token": join_token(&room, "timer")}))
            .await;
        out.push(t.elapsed());
        c.send(json!({"type":"leave","room":room})).await;
        c.expect("leaved").await;
    }
    out
}

fn describe(mut lat: Vec<Duration>) -> String {
    lat.sort();
    let total: Duration = lat.iter().sum();
    format!(
        "median {:?}, max {:?}, total {:?}",
        lat[lat.len() / 2],
        lat[lat.len() - 1],
        total
    )
}

#[tokio::test]
async fn dead_receivers_do_not_slow_joins_and_full_queues_drop_and_count() {
    let t0 = Instant::now();
    // A receiver that reads requests and never answers...
    let mut silent = Receiver::start(|_| Answer::Never).await;
    // ...and a port nobody listens on.
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        format!("http://{}/hook", l.local_addr().expect("addr"))
    };
    let plain = server(keyed(vec![])).await;
    let hooked = server(keyed(vec![silent.url.clone(), refused])).await;

    let without = join_latencies(&plain, 20).await;
    let with = join_latencies(&hooked, 20).await;
    println!("join latency, no webhooks:         {}", describe(without));
    println!("join latency, dead webhook URLs:   {}", describe(with));

    // Both delivery tasks now hold the first event (room_started) for a long
    // time: the silent one waits 5 s per attempt, the refused one backs off
    // 0.5 + 1 + 2 + 4 + 8 + 16 s before giving up. Make sure both took it.
    let first = silent.next().await.json();
    assert_eq!(first["event"], "room_started");
    assert_eq!(first["room"]["name"], "timed-0");
    metrics_when(&hooked, FAILED, 1.0).await;

    // Fill the queues: 4 events a cycle (started, joined, left, finished).
    let events_so_far = 4 * 20;
    let cycles = (QUEUE_CAPACITY + 1 - events_so_far) / 4 + 25;
    let total = events_so_far + 4 * cycles;
    let over = total - (QUEUE_CAPACITY + 1);
    let t = Instant::now();
    for chunk in 0..cycles.div_ceil(40) {
        // A fresh connection every 40 cycles (80 messages) keeps each well
        // under the per-connection rate limit's burst.
        let mut c = Client::connect(&hooked, "filler").await;
        for i in chunk * 40..cycles.min(chunk * 40 + 40) {
            solo(&mut c, &format!("fill-{i}")).await;
        }
    }
    println!(
        "{cycles} more join/leave cycles with full queues: {:?}",
        t.elapsed()
    );

    let m = metrics(&hooked).await;
    assert_eq!(
        metric(&m, GAVE_UP),
        0.0,
        "the refused URL's first event must still be held (≈31 s) for exact counts; \
         this run took {:?}",
        t0.elapsed()
    );
    // Each URL's queue holds QUEUE_CAPACITY behind the one in flight; every
    // event beyond that is dropped at once, for each of the two URLs.
    assert_eq!(metric(&m, QUEUE_FULL), (2 * over) as f64, "{m}");
    assert_eq!(metric(&m, DELIVERED), 0.0);
    assert!(metric(&m, FAILED) >= 1.0);
    assert_eq!(metric(&m, "switchboard_rooms"), 0.0);
    println!(
        "{total} events, {over} dropped per URL; failed attempts so far {}; test took {:?}",
        metric(&m, FAILED),
        t0.elapsed()
    );
}

#[test]
fn webhook_urls_must_be_plain_http() {
    // The delivery client speaks plain HTTP only, so the configuration
    // refuses anything else up front rather than failing every event.
    for url in ["https://127.0.0.1:1/hook", "ftp://x/", "127.0.0.1:1/hook"] {
        let e = Config::resolve(keyed(vec![url.into()]))
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted"))
            .to_string();
        assert!(e.contains("is not a webhook (http://) URL"), "{e}");
    }
    assert!(Config::resolve(keyed(vec!["http://127.0.0.1:1/hook".into()])).is_ok());
}

/// Participants joining and leaving one room from several connections at
/// once, on several threads: the room is freed and made again and again, and
/// its events must still tell one consistent story — `room_finished` never
/// overtaken by the next incarnation's `room_started` or joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_freed_and_made_again_concurrently_keeps_its_story_straight() {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 60;
    let mut rx = Receiver::start(|_| Answer::Status(200)).await;
    let server = server(keyed(vec![rx.url.clone()])).await;
    let names = ["c0", "c1", "c2", "c3"];
    let mut tasks = Vec::new();
    for name in names.into_iter().take(CLIENTS) {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect_url(&url, name).await;
            for _ in 0..ROUNDS {
                c.send(json!({"type":"join","room":"churn","name":name,
                              "token": join_token("churn", name)}))
                    .await;
                // Others' comings and goings may arrive first.
                loop {
                    if c.recv().await["type"] == "joined" {
                        break;
                    }
                }
                c.send(json!({"type":"leave","room":"churn"})).await;
                loop {
                    if c.recv().await["type"] == "leaved" {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let joins = CLIENTS * ROUNDS;
    let mut open = false;
    let mut members = HashSet::new();
    let (mut participant_events, mut incarnations) = (0, 0);
    let mut story = Vec::new();
    while participant_events < 2 * joins || open {
        assert!(story.len() < 4 * joins + 2, "too many events");
        let b = rx.next().await.json();
        let event = b["event"].as_str().unwrap_or_default().to_owned();
        let who = b["participant"]["identity"].as_str().map(str::to_owned);
        story.push(format!("{event} {}", who.as_deref().unwrap_or("")));
        let ok = match (event.as_str(), who) {
            ("room_started", None) => {
                incarnations += 1;
                !std::mem::replace(&mut open, true)
            }
            ("room_finished", None) => members.is_empty() && std::mem::replace(&mut open, false),
            // Auto rooms of three or more move to the SFU (and back).
            ("room_mode_changed", None) => open,
            ("participant_joined", Some(w)) => open && members.insert(w),
            ("participant_left", Some(w)) => open && members.remove(&w),
            _ => false,
        };
        if event.starts_with("participant_") {
            participant_events += 1;
        }
        assert!(
            ok,
            "inconsistent event order, ending: {:#?}",
            &story[story.len().saturating_sub(12)..]
        );
    }
    println!("{joins} joins over {incarnations} incarnations of the room");
    expect_nothing_pending(&server, &mut rx).await;
}
