//! A network of namespaces for the tests that run the real server binary and
//! real browsers (tests/fallback.rs, tests/simulcast.rs): a router namespace,
//! a server namespace and one namespace per participant ([`Site`]), wired
//! with veth pairs, plus the processes started in them. Everything is removed
//! when the [`Net`] is dropped, also on panic.
//!
//! ```text
//!   server ns 10.77.0.2  (<prefix>-s, eth0)
//!        |
//!   router ns  .0.1 | .<n>.1 ...   (<prefix>-r, ip_forward; veth <prefix>s, <prefix><n>)
//!        |          |
//!   site ns 10.77.<n>.2  (<prefix>-<name>, eth0, default route via the router)
//! ```
//!
//! Included with `#[path = "common/netns.rs"] mod netns;` by the tests that
//! need it (it is not part of `common`, which every test crate compiles).
//! Needs root and iproute2.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The server namespace's address (HTTP and, by default, media).
pub const SERVER_IP: &str = "10.77.0.2";
pub const HTTP_PORT: u16 = 8080;
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// One network at a time (per test binary): the browsers share the
/// machine's cores with everything else.
pub static NETWORK: Mutex<()> = Mutex::new(());

/// A participant's subnet: its namespace gets `10.77.<n>.2`, the router `.1`.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    pub name: &'static str,
    pub subnet: u8,
}

impl Site {
    pub fn net(self) -> String {
        format!("10.77.{}.0/24", self.subnet)
    }

    /// The site's own address.
    pub fn ip(self) -> String {
        format!("10.77.{}.2", self.subnet)
    }
}

/// Every namespace and process of one test. Dropping it (also on panic)
/// kills the processes (their groups, then anything left in the
/// namespaces) and deletes the namespaces.
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Net {
    /// Router, server and one namespace per site, wired as in the module
    /// doc. `tag` (two characters) starts every name, so that a leftover is
    /// recognisable.
    pub fn new(tag: &str, sites: &[Site]) -> Net {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut net = Net {
            // Short: interface names derived from it must fit 15 bytes.
            prefix: format!("{tag}{:04x}", (std::process::id() ^ nanos) & 0xffff),
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        let router = net.add_ns("r");
        sh(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let server = net.add_ns("s");
        net.link(&router, &server, "s", 0);
        for site in sites {
            let ns = net.add_ns(site.name);
            net.link(&router, &ns, &site.subnet.to_string(), site.subnet);
        }
        net
    }

    /// The full name of namespace `short` (`r`, `s` or a site's name).
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// The router's end of the veth towards `site` (in namespace `ns("r")`):
    /// what the router sends on it is the site's downlink.
    pub fn router_veth(&self, site: Site) -> String {
        format!("{}{}", self.prefix, site.subnet)
    }

    /// One more address on the server's interface.
    pub fn add_server_address(&self, ip: &str) {
        sh(&[
            "ip",
            "-n",
            &self.ns("s"),
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
    }

    fn add_ns(&mut self, short: &str) -> String {
        let ns = self.ns(short);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        // IPv4 only: an IPv6 link-local address finishing its duplicate
        // detection a moment after the link comes up is a "network change"
        // to a Chromium starting then, which fails its page load with
        // ERR_NETWORK_CHANGED.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth from the router (`10.77.<subnet>.1`, named `<prefix><tag>`) to
    /// `ns` (`eth0`, `.2`, default route via the router).
    fn link(&self, router: &str, ns: &str, tag: &str, subnet: u8) {
        let outer = format!("{}{tag}", self.prefix);
        sh(&[
            "ip",
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{outer}x"),
        ]);
        sh(&["ip", "link", "set", &outer, "netns", router]);
        sh(&["ip", "link", "set", &format!("{outer}x"), "netns", ns]);
        sh(&[
            "ip",
            "-n",
            ns,
            "link",
            "set",
            &format!("{outer}x"),
            "name",
            "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            router,
            "addr",
            "add",
            &format!("10.77.{subnet}.1/24"),
            "dev",
            &outer,
        ]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.77.{subnet}.2/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", router, "link", "set", &outer, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.77.{subnet}.1"),
        ]);
    }

    /// The router refuses traffic between the two sites (both ways).
    pub fn isolate(&self, a: Site, b: Site) {
        let router = self.ns("r");
        for (from, to) in [(a, b), (b, a)] {
            sh(&[
                "ip",
                "-n",
                &router,
                "rule",
                "add",
                "from",
                &from.net(),
                "to",
                &to.net(),
                "prohibit",
            ]);
        }
    }

    /// The router refuses traffic from every site to `ip`.
    pub fn block_to(&self, ip: &str) {
        let router = self.ns("r");
        sh(&["ip", "-n", &router, "rule", "add", "to", ip, "prohibit"]);
    }

    /// `program args` in namespace `short`, in its own process group.
    fn command(
        &self,
        short: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, OsString)],
    ) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(short)])
            .arg(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .process_group(0);
        command
    }

    fn adopt(&mut self, short: &str, program: &Path, mut command: Command) -> usize {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {} in {}: {e}", program.display(), self.ns(short)));
        self.children.push((program.display().to_string(), child));
        self.children.len() - 1
    }

    /// Starts `program args` in namespace `short`, in its own process group,
    /// output to `<log>.stdout` / `<log>.stderr`. Returns its index.
    pub fn spawn(
        &mut self,
        short: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, OsString)],
        log: &Path,
    ) -> usize {
        let mut command = self.command(short, program, args, envs);
        command
            .stdin(Stdio::null())
            .stdout(create(&log.with_extension("stdout")))
            .stderr(create(&log.with_extension("stderr")));
        self.adopt(short, program, command)
    }

    /// As [`Net::spawn`], but the caller talks to the program: its stdin and
    /// stdout are pipes (stderr goes to `<log>.stderr`).
    pub fn spawn_piped(
        &mut self,
        short: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, OsString)],
        log: &Path,
    ) -> (usize, ChildStdin, ChildStdout) {
        let mut command = self.command(short, program, args, envs);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(create(&log.with_extension("stderr")));
        let index = self.adopt(short, program, command);
        let child = &mut self.children[index].1;
        let stdin = child.stdin.take().expect("a piped stdin");
        let stdout = child.stdout.take().expect("a piped stdout");
        (index, stdin, stdout)
    }

    pub fn exited(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        let (what, child) = &mut self.children[index];
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {what}: {e}"))
    }

    /// Kills child `index` (its whole process group).
    pub fn kill(&mut self, index: usize) {
        kill_group(&mut self.children[index].1);
    }

    /// Waits for child `index` to exit, at most `limit`; kills it then.
    /// `Err` also when the child `watch` (the server) exits first.
    pub fn wait(&mut self, index: usize, watch: usize, limit: Duration) -> Result<bool, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited(index) {
                return Ok(status.success());
            }
            if let Some(status) = self.exited(watch) {
                kill_group(&mut self.children[index].1);
                return Err(format!("the server exited early with {status}"));
            }
            if Instant::now() > deadline {
                kill_group(&mut self.children[index].1);
                return Err(format!(
                    "{} did not finish within {limit:?}",
                    self.children[index].0
                ));
            }
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            kill_group(child);
        }
        for ns in &self.namespaces {
            // Whatever still lives in the namespace (a browser that left its
            // process group), or the namespace would outlive us.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        for ns in &self.namespaces {
            // Deleting a namespace also deletes its end of each veth, and so the pair.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// SIGKILL to the child's whole process group (it leads its own), then reap it.
pub fn kill_group(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Runs a setup command; panics with its output when it fails.
pub fn sh(args: &[&str]) {
    if let Err(e) = try_sh(args) {
        panic!("{e}");
    }
}

/// Runs a command; `Err` with its output when it fails.
pub fn try_sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e} (needs root and iproute2)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub fn create(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// A fresh directory for one run's logs: `<target tmp>/<test>-<what>-<pid>-<nanos>`.
pub fn logs_dir(test: &str, what: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{test}-{what}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Panics (does not skip) when Debian's Chromium is missing.
pub fn require_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `apt-get install -y chromium` (.ci/run installs it). \
         This test needs a real browser and does not skip."
    );
}

/// Makes sure `tests/browser/node_modules` has playwright-core (`npm ci` if not).
pub fn ensure_playwright(browser_dir: &Path, logs: &Path) {
    if browser_dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return;
    }
    let log = logs.join("npm-ci.log");
    let out = create(&log);
    let err = out.try_clone().expect("clone a file handle");
    let mut child = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(browser_dir)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("npm: {e} (needs Node.js 20+ and npm)"));
    let deadline = Instant::now() + NPM_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return,
            Ok(Some(s)) => panic!("npm ci exited with {s}:\n{}", read(&log)),
            Ok(None) if Instant::now() > deadline => {
                kill_group(&mut child);
                panic!("npm ci timed out:\n{}", read(&log));
            }
            Ok(None) => sleep(Duration::from_millis(200)),
            Err(e) => panic!("npm ci: {e}"),
        }
    }
}

/// Starts `switchboard serve` in the server namespace (HTTP on
/// `SERVER_IP:HTTP_PORT`, media on `rtc_ip`, no auth: the test's own
/// namespaces, open on purpose) with `extra` options; returns its child index.
pub fn start_server(net: &mut Net, rtc_ip: &str, extra: &[&str], logs: &Path) -> usize {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_switchboard"));
    let listen = format!("{SERVER_IP}:{HTTP_PORT}");
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--no-auth",
        "--rtc-ip",
        rtc_ip,
    ];
    args.extend_from_slice(extra);
    net.spawn(
        "s",
        &server,
        &args,
        &[("NO_COLOR", "1".into())],
        &logs.join("server"),
    )
}

/// Writes `<dir>/chromium-<name>`, an executable that runs Chromium in the
/// namespace of `site` with `extra` flags on top of the harness's. Two are
/// always added: the page is plain http on a namespace address (`base`),
/// which is not a secure context (no camera) unless we say it is; and host
/// candidates must be addresses, not mDNS names that nothing across the
/// router resolves.
pub fn chromium_wrapper(
    dir: &Path,
    net: &Net,
    site: Site,
    base: &str,
    extra: &[String],
) -> PathBuf {
    let wrapper = dir.join(format!("chromium-{}", site.name));
    // Single-quoted for the shell: no flag here contains a quote.
    let extra: String = extra.iter().map(|f| format!(" '{f}'")).collect();
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {CHROMIUM} \
             --unsafely-treat-insecure-origin-as-secure={base} \
             --disable-features=WebRtcHideLocalIpsWithMdns{extra} \"$@\"\n",
            net.ns(site.name)
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", wrapper.display()));
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", wrapper.display()));
    wrapper
}
