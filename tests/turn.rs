//! Switchboard's TURN credentials against real coturn on 127.0.0.1.
//!
//! `joined.iceServers` carries TURN REST credentials (username
//! `<expiry-unix>:<participant-id>`, password `base64(HMAC-SHA1(secret,
//! username))`). Here a real `turnserver` with `use-auth-secret` and the same
//! secret as the in-process Switchboard checks them: coturn's own client
//! `turnutils_uclient` gets relay allocations with them and relays packets
//! through them, while forged, stretched and expired credentials are refused.
//! A third test runs the shipped `deploy/coturn/turnserver.conf`.
//!
//! Needs coturn's `turnserver` and `turnutils_uclient` (Debian package
//! `coturn`; `.ci/run` installs it). Without them these tests fail; they
//! never skip. Everything listens on 127.0.0.1 and every wait is bounded.

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{id_of, Client};
use serde_json::{json, Value};
use switchboard::config::ServeOptions;
use switchboard::ice::turn_credentials;
use switchboard::server::RunningServer;
use switchboard_proto::ParticipantId;

const SECRET: &str = "switchboard-turn-test-secret";
const REALM: &str = "switchboard.test";
const TTL_SECS: u64 = 600;

/// How long coturn gets to answer a STUN Binding after it is started.
const COTURN_START: Duration = Duration::from_secs(10);
/// Hard limit for one `turnutils_uclient` run (a good one takes 2-7 s).
const UCLIENT_TIMEOUT: Duration = Duration::from_secs(40);
/// How long an expected line may take to reach coturn's log.
const LOG_WAIT: Duration = Duration::from_secs(5);

const INSTALL_HINT: &str = "the TURN tests need coturn's `turnserver` and `turnutils_uclient`: \
     install the Debian package `coturn` (`apt-get install -y coturn`; .ci/run does)";

/// The absolute path of `name` on PATH; fails (never skips) without it.
fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not on PATH. {INSTALL_HINT}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both).
fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// A `turnserver` child process; killed (and reaped) on drop, also when the
/// test panics. Its database, pid file and log live in a temp dir.
struct Coturn {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coturn {
    /// Starts coturn on 127.0.0.1 with `config` (`None`: no config file,
    /// flags only) plus `flags`, and waits until it answers STUN.
    async fn start(config: Option<&Path>, flags: &[String]) -> Coturn {
        let turnserver = require_binary("turnserver");
        require_binary("turnutils_uclient");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let log = dir.path().join("coturn.log");
        let out = File::create(&log).expect("create coturn log");
        let err = out.try_clone().expect("clone log handle");

        let mut cmd = Command::new(turnserver);
        match config {
            Some(c) => cmd.arg("-c").arg(c),
            None => cmd.arg("-n"), // no configuration file at all
        };
        cmd.arg("--listening-ip=127.0.0.1")
            .arg("--relay-ip=127.0.0.1")
            .arg(format!("--listening-port={port}"))
            // The peers in these tests are on loopback (coturn refuses them
            // by default).
            .arg("--allow-loopback-peers")
            .arg("--no-cli")
            .arg("--no-tls")
            .arg("--no-dtls")
            .arg(format!("--db={}", dir.path().join("turndb").display()))
            .arg(format!(
                "--pidfile={}",
                dir.path().join("turnserver.pid").display()
            ))
            .arg("--log-file=stdout")
            .arg("--simple-log")
            .arg("--verbose")
            .args(flags)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start turnserver: {e}. {INSTALL_HINT}"));
        let mut coturn = Coturn {
            child,
            port,
            log,
            _dir: dir,
        };
        coturn.wait_ready().await;
        coturn
    }

    /// Waits until coturn answers a STUN Binding request on its UDP port.
    async fn wait_ready(&mut self) {
        let sock = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind probe socket");
        sock.connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .expect("connect probe socket");
        // Binding request: type 0x0001, length 0, magic cookie, transaction id.
        let mut req = [0u8; 20];
        req[1] = 0x01;
        req[4..8].copy_from_slice(&0x2112_A442_u32.to_be_bytes());
        req[8..20].copy_from_slice(b"switchboard!");
        let deadline = Instant::now() + COTURN_START;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll turnserver") {
                panic!(
                    "turnserver exited during start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            // Until the listener is up, the send or recv may fail
            // (ICMP port unreachable); just try again.
            if sock.send(&req).await.is_ok() {
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await
                {
                    if n >= 20 && buf[0..2] == [0x01, 0x01] && buf[8..20] == req[8..20] {
                        return;
                    }
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!(
            "turnserver did not answer STUN on 127.0.0.1:{} within {COTURN_START:?}; its log:\n{}",
            self.port,
            self.log()
        );
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until some log line contains all of `parts`; returns that line.
    async fn wait_for_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_owned();
            }
            if Instant::now() >= deadline {
                panic!("no coturn log line with all of {parts:?} within {LOG_WAIT:?}; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts no allocation was ever made for `username`.
    fn assert_no_allocation_for(&self, username: &str) {
        let log = self.log();
        let needle = format!("username=<{username}>");
        assert!(
            !log.lines().any(|l| l.contains(&needle)),
            "coturn created a session for {username}; log:\n{log}"
        );
    }
}

/// What one `turnutils_uclient` run did.
struct Uclient {
    success: bool,
    status: String,
    output: String,
}

impl Uclient {
    fn allocated(&self) -> bool {
        self.output.contains("Received relay addr: 127.0.0.1:")
    }

    /// The last reported value of `tot_send_msgs` / `tot_recv_msgs`.
    fn count(&self, key: &str) -> u64 {
        let key = format!("{key}=");
        let at = self
            .output
            .rfind(&key)
            .unwrap_or_else(|| panic!("no {key} in uclient output:\n{}", self.output));
        self.output[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("a count")
    }
}

/// Runs coturn's test client against `coturn` over UDP with these
/// credentials: two clients each allocate a relay, bind a channel to the
/// other's relay address and send 3 messages through it (`-y`).
async fn uclient(coturn: &Coturn, username: &str, password: &str) -> Uclient {
    let bin = require_binary("turnutils_uclient");
    let port = coturn.port.to_string();
    let run = tokio::process::Command::new(bin)
        .args(["-v", "-y", "-c", "-n", "3", "-e", "127.0.0.1", "-p", &port])
        .args(["-u", username, "-w", password, "127.0.0.1"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(UCLIENT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "turnutils_uclient ({username}) ran over {UCLIENT_TIMEOUT:?}; coturn log:\n{}",
                coturn.log()
            )
        })
        .expect("run turnutils_uclient");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Uclient {
        success: out.status.success(),
        status: out.status.to_string(),
        output,
    }
}

/// Switchboard (in-process) handing out credentials for `turn_url`.
async fn switchboard(turn_url: &str) -> RunningServer {
    common::server(ServeOptions {
        turn_urls: Some(vec![turn_url.to_owned()]),
        turn_secret: Some(SECRET.to_owned()),
        turn_ttl_secs: Some(TTL_SECS),
        ..Default::default()
    })
    .await
}

/// Joins a room as `name`; returns (participant id, TURN username,
/// password) from `joined.iceServers`, after checking their shape.
async fn joined_credentials(
    server: &RunningServer,
    name: &'static str,
    turn_url: &str,
) -> (String, String, String) {
    let mut client = Client::connect(server, name).await;
    let before = unix_now();
    let joined = client.join("turn-room", json!({})).await;
    let after = unix_now();
    let id = id_of(&joined);
    let servers = joined["iceServers"]
        .as_array()
        .unwrap_or_else(|| panic!("joined has no iceServers: {joined}"));
    let turn = servers
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap_or_else(|| panic!("no TURN entry in {joined}"));
    assert_eq!(turn["urls"], json!([turn_url]), "{joined}");
    let text = |v: &Value| {
        v.as_str()
            .unwrap_or_else(|| panic!("{v} in {joined}"))
            .to_owned()
    };
    let (username, password) = (text(&turn["username"]), text(&turn["credential"]));

    let (expiry, user_id) = username
        .split_once(':')
        .unwrap_or_else(|| panic!("username {username} is not <expiry>:<id>"));
    assert_eq!(user_id, id, "username names the participant");
    let expiry: u64 = expiry.parse().expect("expiry is a unix time");
    assert!(
        (before + TTL_SECS..=after + TTL_SECS).contains(&expiry),
        "expiry {expiry} is not now + {TTL_SECS} s ({before}..={after})"
    );
    (id, username, password)
}

fn show(what: &str, run: &Uclient) {
    let tail: Vec<&str> = run.output.lines().rev().take(4).collect();
    eprintln!(
        "{what}: uclient {} (allocated: {}); last lines: {:?}",
        run.status,
        run.allocated(),
        tail.into_iter().rev().collect::<Vec<_>>()
    );
}

fn test_coturn_flags() -> Vec<String> {
    vec![
        "--use-auth-secret".into(),
        format!("--static-auth-secret={SECRET}"),
        format!("--realm={REALM}"),
        "--fingerprint".into(),
        "--no-tcp-relay".into(),
    ]
}

#[tokio::test]
async fn coturn_relays_with_the_credentials_in_joined() {
    let coturn = Coturn::start(None, &test_coturn_flags()).await;
    let turn_url = format!("turn:127.0.0.1:{}", coturn.port);
    let server = switchboard(&turn_url).await;
    let (_, username, password) = joined_credentials(&server, "alice", &turn_url).await;

    let run = uclient(&coturn, &username, &password).await;
    show("joined credentials", &run);
    assert!(
        run.success && run.allocated(),
        "uclient failed with Switchboard's credentials ({}):\n{}\ncoturn log:\n{}",
        run.status,
        run.output,
        coturn.log()
    );
    // The messages went out through one relay and came in through the other.
    let (sent, received) = (run.count("tot_send_msgs"), run.count("tot_recv_msgs"));
    assert!(
        sent > 0 && received == sent,
        "sent {sent}, received {received}:\n{}",
        run.output
    );
    let line = coturn
        .wait_for_line(&[
            "new,",
            &format!("realm=<{REALM}>"),
            &format!("username=<{username}>"),
        ])
        .await;
    eprintln!("coturn: {line}");
    coturn
        .wait_for_line(&[
            &format!("user <{username}>"),
            "CHANNEL_BIND processed, success",
        ])
        .await;
}

#[tokio::test]
async fn coturn_refuses_forged_stretched_and_expired_credentials() {
    let coturn = Coturn::start(None, &test_coturn_flags()).await;
    let turn_url = format!("turn:127.0.0.1:{}", coturn.port);
    let server = switchboard(&turn_url).await;
    let (id, username, password) = joined_credentials(&server, "alice", &turn_url).await;
    let id = ParticipantId::parse(&id).expect("participant id");
    let expiry: u64 = username
        .split_once(':')
        .and_then(|(e, _)| e.parse().ok())
        .expect("expiry");

    // Signed with a secret that is not coturn's.
    let (_, forged) = turn_credentials("not-the-secret", &id, expiry);
    // The participant's real password on a username with a later expiry.
    let stretched = format!("{}:{id}", expiry + 86_400);
    // Correctly signed with the right secret, but expired a minute ago.
    let (expired, expired_pw) = turn_credentials(
        SECRET,
        &ParticipantId::parse("x").expect("id"),
        unix_now() - 60,
    );

    for (what, user, pass) in [
        ("forged password", &username, &forged),
        ("stretched expiry", &stretched, &password),
        ("expired", &expired, &expired_pw),
    ] {
        let run = uclient(&coturn, user, pass).await;
        show(what, &run);
        assert!(
            !run.success && !run.allocated(),
            "{what}: coturn allocated for {user} ({}):\n{}\ncoturn log:\n{}",
            run.status,
            run.output,
            coturn.log()
        );
        // coturn saw this username and answered 401 (not a network failure).
        let line = coturn
            .wait_for_line(&[&format!("user <{user}>"), "error 401"])
            .await;
        eprintln!("coturn: {line}");
        coturn.assert_no_allocation_for(user);
    }

    // Control: the same coturn takes the genuine credentials.
    let run = uclient(&coturn, &username, &password).await;
    show("genuine (control)", &run);
    assert!(
        run.success && run.allocated(),
        "genuine credentials refused ({}):\n{}\ncoturn log:\n{}",
        run.status,
        run.output,
        coturn.log()
    );
    coturn
        .wait_for_line(&["new,", &format!("username=<{username}>")])
        .await;
}

#[tokio::test]
async fn shipped_coturn_config_takes_switchboard_credentials_and_denies_private_peers() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/coturn/turnserver.conf");
    assert!(config.is_file(), "{} is missing", config.display());
    // The file ships without a secret; the operator supplies it (here on the
    // command line). Everything else comes from the file, apart from the
    // loopback addresses, port, files and TLS being off.
    let coturn = Coturn::start(Some(&config), &[format!("--static-auth-secret={SECRET}")]).await;
    let turn_url = format!("turn:127.0.0.1:{}", coturn.port);
    let server = switchboard(&turn_url).await;
    let (_, username, password) = joined_credentials(&server, "alice", &turn_url).await;

    // Allocations work, but relaying to 127.0.0.1 is refused by the file's
    // denied-peer-ip rules, even with --allow-loopback-peers.
    let run = uclient(&coturn, &username, &password).await;
    show("shipped config, joined credentials", &run);
    assert!(
        run.allocated(),
        "no relay allocation with Switchboard's credentials ({}):\n{}\ncoturn log:\n{}",
        run.status,
        run.output,
        coturn.log()
    );
    coturn
        .wait_for_line(&["new,", &format!("username=<{username}>")])
        .await;
    assert!(
        !run.success && run.output.contains("403"),
        "a loopback peer was not refused ({}):\n{}",
        run.status,
        run.output
    );
    let line = coturn
        .wait_for_line(&[&format!("user <{username}>"), "error 403"])
        .await;
    eprintln!("coturn: {line}");
    coturn
        .wait_for_line(&["denied in the range: 127.0.0.0-127.255.255.255"])
        .await;

    // Credentials signed with the empty key must not work: they would if
    // the file had an uncommented, empty `static-auth-secret=`.
    let id = ParticipantId::parse("y").expect("id");
    let (user, pass) = turn_credentials("", &id, unix_now() + 600);
    let run = uclient(&coturn, &user, &pass).await;
    show("shipped config, empty-key credentials", &run);
    assert!(
        !run.success && !run.allocated(),
        "empty-key credentials got an allocation:\n{}",
        run.output
    );
    coturn
        .wait_for_line(&[&format!("user <{user}>"), "error 401"])
        .await;
    coturn.assert_no_allocation_for(&user);
}
