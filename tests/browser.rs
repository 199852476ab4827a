//! Real-browser end-to-end tests: headless Chromium pages join rooms through
//! the server's own web client and must decode each other's video — two pages
//! over a direct (P2P) WebRTC connection, and three pages through the server's
//! SFU (one connection each to the server, which forwards every track), with
//! the SFU chat channel; and, with access tokens on, pages opened with
//! `?token=`. And classic Socket.IO room pages (the official
//! `socket.io-client` 2.x and 4.x, classic events only) calling P2P, moved to
//! the server when a third joins, refused with `full` under `never`, and in
//! one room with the server's own client.
//!
//! Everything runs inside a fresh network namespace that has only `lo`, so every
//! ICE candidate is 127.0.0.1 and nothing leaves the machine (the server's
//! media port, 127.0.0.1:7882 by default, is private to the namespace too).
//! Needs root (for `ip netns`), Node.js 20+, and Debian's Chromium
//! (`apt-get install -y chromium`; `.ci/run` installs it). The browser drivers
//! are `tests/browser/p2p_call.mjs`, `tests/browser/sfu_call.mjs`,
//! `tests/browser/resume_call.mjs`, `tests/browser/token_call.mjs` and
//! `tests/browser/classic_call.mjs` (pages in `tests/browser/classic/`).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHROMIUM: &str = "/usr/bin/chromium";
const LISTEN: &str = "127.0.0.1:18080";
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// One browser run at a time: they share two cores with everything else, and
/// a starved Chromium makes timing flaky.
static BROWSER_RUNS: Mutex<()> = Mutex::new(());

/// Owns the namespace and every process started in it. Dropping it (also on
/// panic) kills the processes and deletes the namespace.
struct Sandbox {
    netns: String,
    children: Vec<(&'static str, Child)>,
}

impl Sandbox {
    fn new(netns: String) -> Self {
        run_checked(
            Command::new("ip").args(["netns", "add", &netns]),
            "create the network namespace (needs root)",
        );
        let sandbox = Sandbox {
            netns,
            children: Vec::new(),
        };
        run_checked(
            Command::new("ip").args(["-n", &sandbox.netns, "link", "set", "lo", "up"]),
            "bring up lo in the namespace",
        );
        sandbox
    }

    /// Starts `program args` inside the namespace, in its own process group,
    /// with stdout and stderr going to `<log>.stdout` and `<log>.stderr`.
    fn spawn(
        &mut self,
        what: &'static str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &OsStr)],
        log: &Path,
    ) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(create(&log.with_extension("stdout")))
            .stderr(create(&log.with_extension("stderr")))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what} ({}): {e}", program.display()));
        self.children.push((what, child));
        self.children.len() - 1
    }

    fn try_wait(&mut self, index: usize) -> Option<ExitStatus> {
        let (what, child) = &mut self.children[index];
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {what}: {e}"))
    }

    fn kill(&mut self, index: usize) {
        let (_, child) = &mut self.children[index];
        kill_group(child);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            kill_group(child);
        }
        // Anything else still living in the namespace (e.g. a browser process that
        // left the process group) goes too, or the namespace would outlive us.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

/// SIGKILL to the child's whole process group (it leads its own), then reap it.
fn kill_group(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn run_checked(cmd: &mut Command, what: &str) {
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "could not {what}: {:?} exited with {}\n{}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("could not {what}: {cmd:?}: {e}"),
    }
}

/// Runs `cmd` to completion, killing it after `limit`. Output goes to `log`.
fn run_bounded(cmd: &mut Command, limit: Duration, log: &Path) -> Result<(), String> {
    let out = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{cmd:?} exited with {status}\n{}", read(log))),
            Ok(None) if Instant::now() > deadline => {
                kill_group(&mut child);
                return Err(format!("{cmd:?} timed out after {limit:?}\n{}", read(log)));
            }
            Ok(None) => sleep(Duration::from_millis(200)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn create(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Makes sure `tests/browser/node_modules` has playwright-core and both
/// socket.io-client versions (`npm ci` if not).
fn ensure_playwright(browser_dir: &Path, logs: &Path) {
    if ["playwright-core", "socket.io-client2", "socket.io-client4"]
        .iter()
        .all(|m| {
            browser_dir
                .join(format!("node_modules/{m}/package.json"))
                .is_file()
        })
    {
        return;
    }
    let log = logs.join("npm-ci.log");
    if let Err(e) = run_bounded(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(browser_dir)
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"),
        NPM_TIMEOUT,
        &log,
    ) {
        panic!("`npm ci --prefix tests/browser` failed (needs Node.js 20+ and npm with registry access):\n{e}");
    }
}

/// Starts the server (defaults, HTTP on [`LISTEN`], plus `server_env`) in a
/// fresh namespace, runs `node tests/browser/<script> <base url> <args>`
/// there, and returns the script's `{"ok":true,...}` line. Panics with the
/// script's and the server's output when the script fails, times out
/// (`limit`), or the server dies.
fn run_browser_script(
    script: &str,
    server_env: &[(&str, &str)],
    args: &[&str],
    limit: Duration,
) -> String {
    run_in_sandbox(script, Some(server_env), args, limit)
}

/// As [`run_browser_script`]; with `server_env` `None` the script starts
/// (and restarts) the server itself: it gets the binary's path and
/// `serve --listen` [`LISTEN`] after the base URL.
fn run_in_sandbox(
    script: &str,
    server_env: Option<&[(&str, &str)]>,
    args: &[&str],
    limit: Duration,
) -> String {
    let _one_at_a_time = BROWSER_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let server = PathBuf::from(env!("CARGO_BIN_EXE_switchboard"));
    let suffix = unique_suffix();
    let stem = script.trim_end_matches(".mjs");
    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-{stem}-{suffix}"));
    fs::create_dir_all(&logs).unwrap_or_else(|e| panic!("create {}: {e}", logs.display()));

    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `apt-get install -y chromium` (.ci/run installs it). \
         This test needs a real browser and does not skip."
    );
    ensure_playwright(&browser_dir, &logs);

    let mut sandbox = Sandbox::new(format!("sbt-{suffix}"));
    let server_log = logs.join("server");
    let node_log = logs.join("node");
    // Plain logs in the failure report.
    let mut env = vec![("NO_COLOR", OsStr::new("1"))];
    env.extend(
        server_env
            .unwrap_or(&[])
            .iter()
            .map(|&(k, v)| (k, OsStr::new(v))),
    );
    let server_str = server.to_str().expect("utf-8 path");
    let srv = server_env.map(|_| {
        sandbox.spawn(
            "switchboard",
            &server,
            &["serve", "--listen", LISTEN],
            &env,
            &server_log,
        )
    });
    let own_server = [server_str, "serve", "--listen", LISTEN];
    let args: Vec<&str> = match server_env {
        Some(_) => args.to_vec(),
        None => [&own_server[..], args].concat(),
    };
    let args = args.as_slice();
    let script_path = browser_dir.join(script);
    let script_path = script_path.to_str().expect("utf-8 path");
    let base = format!("http://{LISTEN}");
    // Screenshots of the pages (mid-call, or at the failure) land next to the logs
    // unless the caller chose a place.
    let shots = std::env::var_os("SB_SCREENSHOT_DIR").map_or_else(|| logs.clone(), PathBuf::from);
    // Chromium puts its singleton socket under TMPDIR and aborts when that path
    // exceeds the 108-byte unix socket limit, which a deep checkout reaches
    // easily: so a short directory in /tmp, removed when this function returns.
    let node_tmp = tempfile::Builder::new()
        .prefix("sb-")
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("create a temp dir in /tmp: {e}"));
    let node = sandbox.spawn(
        "node",
        Path::new("node"),
        &[&[script_path, base.as_str()], args].concat(),
        &[
            ("SB_SCREENSHOT_DIR", shots.as_os_str()),
            // Browser profile and Playwright scratch files go to our own temp dir.
            ("TMPDIR", node_tmp.path().as_os_str()),
        ],
        &node_log,
    );

    let deadline = Instant::now() + limit;
    let node_status = loop {
        if let Some(status) = sandbox.try_wait(node) {
            break Ok(status);
        }
        if let Some(status) = srv.and_then(|srv| sandbox.try_wait(srv)) {
            sandbox.kill(node);
            break Err(format!("the server exited early with {status}"));
        }
        if Instant::now() > deadline {
            sandbox.kill(node);
            break Err(format!(
                "node did not finish within {limit:?} and was killed"
            ));
        }
        sleep(Duration::from_millis(100));
    };
    let server_alive = srv.is_none_or(|srv| sandbox.try_wait(srv).is_none());
    drop(sandbox); // kills the server and anything left, deletes the namespace

    let stdout = read(&node_log.with_extension("stdout"));
    let report = format!(
        "--- node {script} stdout ---\n{stdout}\n--- node stderr ---\n{}\n\
         --- switchboard stderr ---\n{}\n--- switchboard stdout ---\n{}\n(logs in {}, screenshots in {})",
        read(&node_log.with_extension("stderr")),
        read(&server_log.with_extension("stderr")),
        read(&server_log.with_extension("stdout")),
        logs.display(),
        shots.display(),
    );
    match node_status {
        Ok(status) if status.success() => {
            assert!(server_alive, "the server died during the call\n{report}");
            let line = stdout
                .lines()
                .find(|l| l.starts_with("{\"ok\":true"))
                .unwrap_or("");
            assert!(
                !line.is_empty(),
                "node exited 0 without a success line\n{report}"
            );
            if std::env::var_os("SB_SCREENSHOT_DIR").is_none() {
                let _ = fs::remove_dir_all(&logs); // keep the logs of failed runs only
            }
            line.to_owned()
        }
        Ok(status) => panic!("the browser call failed (node exited with {status})\n{report}"),
        Err(why) => panic!("{why}\n{report}"),
    }
}

/// Two pages in one room talk peer to peer and decode each other's video.
#[test]
fn two_chromium_pages_make_a_p2p_call() {
    // p2p_call.mjs gives up on its own after 60 s.
    let line = run_browser_script("p2p_call.mjs", &[], &[], Duration::from_secs(90));
    println!("{line}");
}

/// Two pages in an SFU room lose their WebSockets at once (a proxy resets
/// them, no close handshake): each reconnects and resumes by itself, keeps
/// its id and its call, and the other's video goes on.
#[test]
fn chromium_pages_resume_after_their_websockets_drop() {
    // resume_call.mjs gives up on its own after 90 s.
    let line = run_browser_script("resume_call.mjs", &[], &[], Duration::from_secs(120));
    println!("{line}");
}

/// Three pages in a room created `mode=sfu`: each decodes both others' video
/// and receives both others' audio through its one server connection, tiles
/// are labelled with the right names, and a chat message reaches the others.
#[test]
fn three_chromium_pages_in_an_sfu_room() {
    // sfu_call.mjs gives up on its own after 90 s.
    let line = run_browser_script("sfu_call.mjs", &[], &["forward"], Duration::from_secs(120));
    println!("{line}");
}

/// Three pages in a room created `mode=sfu&audio=mix`: each receives exactly
/// one inbound audio stream, the server's mix, with packets flowing (and no
/// audio per participant), decodes both others' video, and highlights the
/// tiles the server's `speakers` names.
#[test]
fn three_chromium_pages_in_a_mix_room() {
    // sfu_call.mjs gives up on its own after 90 s.
    let line = run_browser_script("sfu_call.mjs", &[], &["mix"], Duration::from_secs(120));
    println!("{line}");
}

const API_KEY: &str = "browser-test-key";
const API_SECRET: &str = "browser-test-secret-0123456789abcdef";

/// `switchboard token --identity ID --name NAME` plus `extra`, signed with
/// `secret` under [`API_KEY`]: the token on stdout.
fn mint(secret: &str, identity: &str, name: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--api-key", API_KEY, "--api-secret", secret])
        .args(["--identity", identity, "--name", name])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("run switchboard token: {e}"));
    assert!(
        out.status.success(),
        "switchboard token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf-8 token");
    token.trim().to_owned()
}

/// Auth on (key from SWITCHBOARD_API_KEY/SWITCHBOARD_API_SECRET), tokens from
/// `switchboard token`. Pages opened with only `?token=` join the token's room
/// under its names (room label, URL, the `join` they sent, the admin API's
/// member list) and decode each other's video. A forged token and a
/// non-token each show "Access denied", leave the page in the lobby, send
/// one join and no more, and add nobody to the room (admin API). alice's
/// token in a new page replaces the first page ("another tab or device"; it
/// stays out; bob decodes the new alice), and an admin removal puts bob out
/// ("removed"; he stays out; the room lists only the new alice).
#[test]
fn chromium_pages_join_with_access_tokens() {
    let room = format!("tok-{}", unique_suffix());
    let for_room = ["--room", room.as_str()];
    let alice = mint(API_SECRET, "alice", "Alice", &for_room);
    let bob = mint(API_SECRET, "bob", "Bob", &for_room);
    let forged = mint(
        "not-the-server-secret-0123456789abcdef",
        "mallory",
        "Mallory",
        &for_room,
    );
    let admin = mint(API_SECRET, "admin", "Admin", &["--admin"]);
    // token_call.mjs gives up on its own after 120 s.
    let line = run_browser_script(
        "token_call.mjs",
        &[
            ("SWITCHBOARD_API_KEY", API_KEY),
            ("SWITCHBOARD_API_SECRET", API_SECRET),
        ],
        &[&room, &alice, &bob, &forged, &admin],
        Duration::from_secs(150),
    );
    println!("{line}");
}

/// Two pages in an SFU room; the server process is killed and started
/// again at the same address (by the script): both pages notice, fail to
/// resume, join again by themselves with new ids and decode each other's
/// video again. Prints the time from the kill to both decoding.
#[test]
fn chromium_pages_rejoin_a_restarted_server_by_themselves() {
    // restart_call.mjs gives up on its own after 120 s.
    let line = run_in_sandbox("restart_call.mjs", None, &[], Duration::from_secs(150));
    println!("{line}");
}

/// Cluster mode (`cluster_call.mjs`): two pages on node-b in a room on
/// node-a; node-a is killed; both pages are told, join again by themselves
/// on node-b and decode each other's video again. Prints the time from the
/// kill to both decoding.
#[test]
fn chromium_pages_rejoin_on_a_live_node_when_their_rooms_node_dies() {
    // cluster_call.mjs gives up on its own after 120 s.
    let line = run_in_sandbox("cluster_call.mjs", None, &[], Duration::from_secs(150));
    println!("{line}");
}

/// `classic_call.mjs <scenario>` against a server with `--socketio-relay
/// relay`; the script gives up on its own after 120 s.
fn classic(relay: &str, scenario: &str) -> String {
    run_browser_script(
        "classic_call.mjs",
        &[("SWITCHBOARD_SOCKETIO_RELAY", relay)],
        &[scenario],
        Duration::from_secs(150),
    )
}

/// Two classic pages (socket.io-client 2.x over Engine.IO 3, and 4.x over
/// Engine.IO 4, both upgraded to WebSocket) make a P2P call: `joined`, then
/// `otherjoin` to the one already there, who offers; each decodes the other's
/// picture (by its colour) and hears the other's tone and not its own; the
/// server's media port receives nothing.
#[test]
fn classic_socketio_pages_make_a_p2p_call() {
    println!("{}", classic("auto", "p2p"));
}

/// With `auto`, a third classic page moves the call to the server: the two
/// P2P callers get `bye` for each other, then `otherjoin(room, "sfu")`; each
/// of the three then hears the two others' tones in the mix (and not its
/// own) and sees the loudest other; when the quietest becomes the loudest,
/// every picture follows. Prints the time from the third join to media on
/// all three.
#[test]
fn a_third_classic_page_moves_the_call_to_the_server() {
    println!("{}", classic("auto", "third"));
}

/// With `never`, the old server exactly: a third classic page gets `full`
/// and nothing else, and the two in the call go on undisturbed.
#[test]
fn with_never_a_third_classic_page_gets_full() {
    println!("{}", classic("never", "never"));
}

/// A classic page and a page of the server's own client in one room see and
/// hear each other: peer to peer with `auto`, through the server with
/// `always` (the classic page gets the own page's picture as the active
/// speaker and the mix; the own page gets the classic page's picture).
#[test]
fn a_classic_page_and_an_own_client_page_share_a_room() {
    println!("{}", classic("auto", "mixed-p2p"));
    println!("{}", classic("always", "mixed-sfu"));
}
