//! Running the Python aiortc peer (`tests/aiortc/peer.py`).

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncReadExt;

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
