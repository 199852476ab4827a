//! Running the Python aiortc peer (`tests/aiortc/peer.py`).

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The peer script.
pub fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/aiortc/peer.py")
}

/// Fails (never skips) when python3 cannot import what peer.py needs.
pub fn require_aiortc() {
    let out = std::process::Command::new("python3")
        .args(["-c", "import aiortc, websockets, av"])
        .stdin(Stdio::null())
        .output();
    let hint = "the aiortc interop test needs Python's aiortc: run \
                `pip install -r tests/aiortc/requirements.txt` (.ci/run installs it)";
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{hint}\n`python3 -c 'import aiortc, websockets, av'` failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{hint}\ncannot run python3: {e}"),
    }
}

/// Reads a child's pipe to the end in the background.
pub fn slurp<R: AsyncReadExt + Unpin + Send + 'static>(
    pipe: Option<R>,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf).await;
            text = String::from_utf8_lossy(&buf).into_owned();
        }
        text
    })
}

/// A running peer.py and its output, read in the background.
pub struct Peer {
    pub child: Child,
    pub stdout: JoinHandle<String>,
    pub stderr: JoinHandle<String>,
}

/// Starts `python3 tests/aiortc/peer.py ARGS` (killed when dropped).
pub fn spawn_peer(args: &[&str]) -> Peer {
    let script = peer_script();
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start python3 {}: {e}", script.display()));
    let stdout = slurp(child.stdout.take());
    let stderr = slurp(child.stderr.take());
    Peer {
        child,
        stdout,
        stderr,
    }
}
