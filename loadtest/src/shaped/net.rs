//! The network and the processes of `loadtest shaped`: a namespace for the
//! shaped viewer joined to the root namespace by a veth pair (root side
//! `10.78.<k>.1/30`, namespace side `.2/30`, `lo` up in the namespace), the
//! server bound to the root side's address, the `tbf` qdisc on the root
//! side (the viewer's downlink), and the cleanup of all of it.
//!
//! [`Sandbox`]'s `Drop` (also on error or panic) kills the server and every
//! process in the namespace, removes the qdisc and the veth pair and
//! deletes the namespace; SIGINT and SIGTERM do the same before the process
//! exits with 130. Needs root and iproute2 (`ip`, `tc`).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Longest wait for the server's `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for one `ip` or `tc` command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What has to go when the run ends: filled as things are created, read
/// by `Drop` and by the signal handler.
#[derive(Debug, Default)]
struct Owned {
    netns: Option<String>,
    veth: Option<String>,
    /// Pids to kill (the server, the child viewer).
    pids: Vec<u32>,
}

/// The namespace, the veth pair and the processes of one run.
pub struct Sandbox {
    pub netns: String,
    /// The root namespace's end of the pair (its egress is the shaped
    /// viewer's downlink).
    pub veth: String,
    /// The root side's address (the server's) and the namespace side's.
    pub root_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    owned: Arc<Mutex<Owned>>,
    server: Option<Child>,
}

/// Runs a command to its end within [`COMMAND_TIMEOUT`]; its stdout, or
/// why not.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} {} did not finish", args.join(" ")));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed ({}; needs root): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Kills `pid`: SIGTERM, then SIGKILL after `grace` if still there.
fn kill(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Removes whatever `owned` still names: kills its pids and everything in
/// the namespace, deletes the qdisc, the veth pair and the namespace.
/// Idempotent.
fn clean(owned: &Mutex<Owned>) {
    let mut o = match owned.lock() {
        Ok(o) => o,
        Err(poisoned) => poisoned.into_inner(),
    };
    for pid in o.pids.drain(..) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    if let Some(veth) = o.veth.take() {
        let _ = run("tc", &["qdisc", "del", "dev", &veth, "root"]);
        let _ = ip(&["link", "del", &veth]);
    }
    if let Some(ns) = o.netns.take() {
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill")
                    .args(["-KILL", pid])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = ip(&["netns", "delete", &ns]);
    }
}

/// A `10.78.<k>.0/30` that no interface of the root namespace is in,
/// starting from one picked by our pid.
fn free_subnet() -> Result<u8, String> {
    let shown = ip(&["-o", "-4", "addr", "show"])?;
    let start = (std::process::id() % 250) as u8;
    (0..250u8)
        .map(|i| 1 + (start.wrapping_add(i) % 250))
        .find(|k| !shown.contains(&format!(" 10.78.{k}.")))
        .ok_or_else(|| "no free 10.78.<k>.0/30 subnet".to_owned())
}

impl Sandbox {
    /// Creates the namespace and the veth pair, and starts watching for
    /// SIGINT and SIGTERM.
    pub fn new() -> Result<Sandbox, String> {
        let k = free_subnet()?;
        let tag = format!("{:05x}", std::process::id() & 0xf_ffff);
        let netns = format!("lt-shp-{tag}");
        let veth = format!("lts{tag}r");
        let peer = format!("lts{tag}n");
        let owned = Arc::new(Mutex::new(Owned::default()));
        let sandbox = Sandbox {
            netns: netns.clone(),
            veth: veth.clone(),
            root_ip: Ipv4Addr::new(10, 78, k, 1),
            ns_ip: Ipv4Addr::new(10, 78, k, 2),
            owned: owned.clone(),
            server: None,
        };
        watch_signals(owned.clone());
        ip(&["netns", "add", &netns])?;
        lock(&owned).netns = Some(netns.clone());
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        lock(&owned).veth = Some(veth.clone());
        ip(&["link", "set", &peer, "netns", &netns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", sandbox.root_ip),
            "dev",
            &veth,
        ])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/30", sandbox.ns_ip),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &netns, "link", "set", &peer, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(sandbox)
    }

    /// Starts the server on the root side's address (HTTP and media, ports
    /// picked by the kernel), its stdout and stderr to `log` (or nowhere),
    /// and waits for its `listening on` line. Returns its pid and HTTP
    /// address.
    pub fn start_server(
        &mut self,
        bin: &Path,
        log: Option<&Path>,
    ) -> Result<(u32, SocketAddr), String> {
        let ip = self.root_ip.to_string();
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", &format!("{ip}:0")])
            .args(["--rtc-ip", &ip, "--rtc-port", "0"])
            // Our own veth address and our own clients: no key.
            .arg("--no-auth")
            .args(["--shutdown-grace-ms", "500"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // Settings from the environment would change what is measured.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SWITCHBOARD_") {
                cmd.env_remove(key);
            }
        }
        let mut log_file = match log {
            Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        match &log_file {
            Some(f) => cmd.stderr(f.try_clone().map_err(|e| e.to_string())?),
            None => cmd.stderr(Stdio::null()),
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        lock(&self.owned).pids.push(pid);
        let stdout = child.stdout.take();
        self.server = Some(child);
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                if let Some(Ok(first)) = lines.next() {
                    let _ = tx.send(first);
                }
                // Keep draining so the server never blocks on a full pipe.
                for line in lines.map_while(Result::ok) {
                    if let Some(f) = log_file.as_mut() {
                        use std::io::Write as _;
                        let _ = writeln!(f, "{line}");
                    }
                }
            });
        }
        let first = rx.recv_timeout(START_TIMEOUT).map_err(|_| {
            let exited = self.server.as_mut().and_then(|c| {
                // Its stdout closed: it is exiting, give it a moment.
                let until = Instant::now() + Duration::from_secs(1);
                loop {
                    match c.try_wait() {
                        Ok(None) if Instant::now() < until => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Ok(s) => return s,
                        Err(_) => return None,
                    }
                }
            });
            match exited {
                Some(status) => format!(
                    "{} exited at start-up ({status}) without a `listening on` line",
                    bin.display()
                ),
                None => format!(
                    "{} printed no `listening on` line within {START_TIMEOUT:?}",
                    bin.display()
                ),
            }
        })?;
        let addr = first
            .trim()
            .strip_prefix("switchboard listening on http://")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("unexpected first line from the server: {first:?}"))?;
        Ok((pid, addr))
    }

    /// Whether the server is still running.
    pub fn server_alive(&mut self) -> bool {
        self.server
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A command that runs `program` inside the namespace.
    pub fn in_netns(&self, program: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Notes a pid to kill at the end (`ip netns exec` execs the program,
    /// so the child's pid is the program's).
    pub fn own_pid(&self, pid: u32) {
        lock(&self.owned).pids.push(pid);
    }

    /// `tc qdisc add dev <veth> root tbf rate <kbit>kbit burst 20kb latency
    /// 200ms`; checks that it is there.
    pub async fn cap(&self, kbit: u32) -> Result<(), String> {
        let rate = format!("{kbit}kbit");
        tc(&[
            "qdisc", "add", "dev", &self.veth, "root", "tbf", "rate", &rate, "burst", "20kb",
            "latency", "200ms",
        ])
        .await?;
        let shown = tc(&["qdisc", "show", "dev", &self.veth]).await?;
        if shown.contains("tbf") {
            Ok(())
        } else {
            Err(format!("no tbf on {} after adding it: {shown}", self.veth))
        }
    }

    /// Notes the qdisc's counters, then deletes it.
    pub async fn uncap(&self) -> Result<Tbf, String> {
        let stats = tc(&["-s", "qdisc", "show", "dev", &self.veth]).await?;
        tc(&["qdisc", "del", "dev", &self.veth, "root"]).await?;
        Ok(Tbf::parse(&stats))
    }
}

fn lock(owned: &Mutex<Owned>) -> std::sync::MutexGuard<'_, Owned> {
    match owned.lock() {
        Ok(o) => o,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// `tc` without blocking the runtime, bounded by [`COMMAND_TIMEOUT`].
async fn tc(args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        COMMAND_TIMEOUT,
        tokio::process::Command::new("tc")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("tc {} did not finish", args.join(" ")))?
    .map_err(|e| format!("cannot run tc: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "tc {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            kill(&mut server, Duration::from_secs(3));
        }
        clean(&self.owned);
    }
}

/// On SIGINT or SIGTERM (which would end the process without `Drop`),
/// removes everything [`Owned`] names, then exits with 130.
fn watch_signals(owned: Arc<Mutex<Owned>>) {
    crate::proc::on_interrupt(move || {
        eprintln!("loadtest shaped: interrupted; removing the namespace and the server");
        clean(&owned);
    });
}

/// The `tbf` qdisc's counters when the cap came off (`tc -s qdisc show`:
/// `Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Tbf {
    pub sent_bytes: Option<u64>,
    pub sent_packets: Option<u64>,
    pub dropped: Option<u64>,
    pub overlimits: Option<u64>,
    /// The command's output as is.
    pub text: String,
}

impl Tbf {
    pub fn parse(stats: &str) -> Tbf {
        let words: Vec<&str> = stats
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
            .filter(|w| !w.is_empty())
            .collect();
        let at = |i: Option<usize>| i.and_then(|i| words.get(i)).and_then(|w| w.parse().ok());
        let pos = |key: &str| words.iter().position(|w| *w == key);
        Tbf {
            sent_bytes: at(pos("Sent").map(|i| i + 1)),
            sent_packets: at(pos("pkt").and_then(|i| i.checked_sub(1))),
            dropped: at(pos("dropped").map(|i| i + 1)),
            overlimits: at(pos("overlimits").map(|i| i + 1)),
            text: stats.trim().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tbf_counters() {
        let t = Tbf::parse(
            "qdisc tbf 8001: root refcnt 2 rate 600Kbit burst 20Kb lat 200ms \n \
             Sent 2345678 bytes 2012 pkt (dropped 321, overlimits 4567 requeues 0) \n \
             backlog 0b 0p requeues 0\n",
        );
        assert_eq!(t.sent_bytes, Some(2_345_678));
        assert_eq!(t.sent_packets, Some(2012));
        assert_eq!(t.dropped, Some(321));
        assert_eq!(t.overlimits, Some(4567));
        assert_eq!(Tbf::parse("nothing").dropped, None);
    }
}
