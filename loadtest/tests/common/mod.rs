//! Helpers shared by loadtest's integration tests: the binaries, and
//! running `loadtest` as a user does, bounded in time.

#![allow(dead_code)] // each test crate uses its own part of it

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const LOADTEST: &str = env!("CARGO_BIN_EXE_loadtest");

/// The server binary cargo builds next to `loadtest`.
pub fn switchboard_bin() -> PathBuf {
    let path = Path::new(LOADTEST).with_file_name("switchboard");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p switchboard` \
         (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// Fails the test, saying why, unless it runs as root (the effective uid
/// in /proc/self/status): network namespaces, veth pairs and `tc` need it.
pub fn require_root(what: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned);
    assert_eq!(
        euid.as_deref(),
        Some("0"),
        "{what} needs root (ip netns, veth, tc): run the tests as root"
    );
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Fails the test, with everything loadtest printed, unless it exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "exit {:?}\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `loadtest` with `args`; if it is still running after `limit` (a
/// hang: the runs bound themselves well inside it) it gets SIGTERM (its
/// handler cleans up what it set up), then SIGKILL 5 s later, and the test
/// fails.
pub fn loadtest(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(LOADTEST)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadtest");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "loadtest {args:?} still running after {limit:?}; stderr so far:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}
