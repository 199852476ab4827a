//! Sampling processes and the machine through `/proc` (Linux only).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;

/// Which process to sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    /// This process (`/proc/self`).
    Own,
    /// Another process by id.
    Other(u32),
}

impl Pid {
    fn dir(self) -> PathBuf {
        match self {
            Pid::Own => PathBuf::from("/proc/self"),
            Pid::Other(pid) => PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// Whether the process exists (its `/proc` directory does).
    pub fn exists(self) -> bool {
        self.dir().is_dir()
    }
}

/// The process's command name (`/proc/PID/comm`, at most 15 bytes).
pub fn comm(pid: Pid) -> io::Result<String> {
    Ok(std::fs::read_to_string(pid.dir().join("comm"))?
        .trim_end()
        .to_owned())
}

/// Resident set size in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: Pid) -> io::Result<u64> {
    let status = std::fs::read_to_string(pid.dir().join("status"))?;
    parse_vm_rss(&status).ok_or_else(|| invalid("no VmRSS line in /proc/PID/status"))
}

/// Open file descriptors (entries of `/proc/PID/fd`).
pub fn open_fds(pid: Pid) -> io::Result<u64> {
    Ok(std::fs::read_dir(pid.dir().join("fd"))?.count() as u64)
}

/// Threads (`Threads` of `/proc/PID/status`).
pub fn threads(pid: Pid) -> io::Result<u64> {
    let status = std::fs::read_to_string(pid.dir().join("status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("no Threads line in /proc/PID/status"))
}

/// CPU time used so far, user plus system (`utime + stime` of `/proc/PID/stat`).
pub fn cpu_time(pid: Pid) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(pid.dir().join("stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| invalid("malformed /proc/PID/stat"))?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_sec()))
}

/// CPU time (user plus system) of each thread name of a process, summed
/// over the threads that share the name (`/proc/PID/task/*/{comm,stat}`).
pub fn thread_cpu_times(pid: Pid) -> io::Result<std::collections::BTreeMap<String, Duration>> {
    let hz = clock_ticks_per_sec();
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(pid.dir().join("task"))? {
        let dir = entry?.path();
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        let Some(ticks) = parse_stat_cpu_ticks(&stat) else {
            continue;
        };
        *out.entry(comm.trim_end().to_owned())
            .or_insert(Duration::ZERO) += ticks_to_duration(ticks, hz);
    }
    Ok(out)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that cannot be run).
/// The value is queried once; without `unsafe` we cannot call `sysconf` directly.
pub fn clock_ticks_per_sec() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

fn ticks_to_duration(ticks: u64, hz: u64) -> Duration {
    let hz = hz.max(1);
    Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz)
}

/// `VmRSS:   12345 kB` → bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let factor = match parts.next() {
        Some("kB") | Some("KB") => 1024,
        Some("mB") | Some("MB") => 1024 * 1024,
        Some("B") | None => 1,
        Some(_) => return None,
    };
    Some(value * factor)
}

/// Fields 14 (`utime`) + 15 (`stime`) of `/proc/PID/stat`, in clock ticks.
///
/// The second field (`comm`) is in parentheses and may itself hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After `)`: field 3 (state) is index 0, so utime (14) is index 11, stime index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use (`nproc`).
    pub nproc: usize,
    /// CPUs listed in `/proc/cpuinfo`.
    pub cpus_online: usize,
    /// `model name` from `/proc/cpuinfo` (or `unknown`).
    pub cpu_model: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute load averages when the run started.
    pub loadavg: [f64; 3],
    /// Clock ticks per second used for the CPU figures.
    pub clk_tck: u64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (cpus_online, cpu_model) = parse_cpuinfo(&cpuinfo);
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| parse_loadavg(&s))
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpus_online,
            cpu_model,
            loadavg,
            clk_tck: clock_ticks_per_sec(),
        }
    }
}

/// Number of `processor` entries and the first `model name` (ARM kernels may
/// only give `Hardware` or `CPU part`; then the model is `unknown`).
pub fn parse_cpuinfo(cpuinfo: &str) -> (usize, String) {
    let value = |line: &str| line.split_once(':').map(|(_, v)| v.trim().to_owned());
    let count = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
        .count();
    let model = ["model name", "Hardware", "cpu model"]
        .iter()
        .find_map(|key| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == *key))
                .and_then(value)
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    (count, model)
}

fn parse_loadavg(s: &str) -> Option<[f64; 3]> {
    let mut it = s.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The soft limit on open files of this process (`Max open files` in
/// `/proc/self/limits`); `None` if unlimited or unreadable.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&limits)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The kernel's UDP counters (`Udp:` lines of `/proc/net/snmp`, system-wide
/// for this network namespace): `InDatagrams`, `RcvbufErrors`, ...
pub fn udp_counters() -> Option<BTreeMap<String, u64>> {
    parse_snmp_udp(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

fn parse_snmp_udp(snmp: &str) -> Option<BTreeMap<String, u64>> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    let map: BTreeMap<String, u64> = names
        .zip(values)
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect();
    (!map.is_empty()).then_some(map)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// On SIGINT or SIGTERM (which would end the process without running
/// `Drop`), runs `cleanup` on a thread of its own, then exits with 130.
pub fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let signalled = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return false;
            };
            tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => true,
            }
        });
        if signalled {
            cleanup();
            std::process::exit(130);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status =
            "Name:\tswitchboard\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        // comm "a) b (c" holds spaces and parentheses; utime=1500, stime=250.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194304 100 0 0 0 1500 250 0 0 20 0 3 0 \
                    12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(1750));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parens"), None);
    }

    #[test]
    fn ticks_convert() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 1000), Duration::from_millis(1));
        assert_eq!(ticks_to_duration(3, 0), Duration::from_secs(3));
    }

    #[test]
    fn reads_own_rss_and_cpu() {
        assert!(Pid::Own.exists());
        let rss = rss_bytes(Pid::Own).expect("VmRSS of /proc/self");
        assert!(rss > 100 * 1024, "implausible RSS {rss}");
        let before = cpu_time(Pid::Own).expect("stat of /proc/self");
        // Burn ~150 ms of CPU so at least one tick is charged.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = cpu_time(Pid::Own).expect("stat of /proc/self");
        assert!(
            after > before,
            "cpu time did not advance: {before:?} -> {after:?}"
        );
        // Our own pid, named explicitly, reads the same files.
        assert!(rss_bytes(Pid::Other(std::process::id())).is_ok());
        let name = comm(Pid::Own).expect("comm of /proc/self");
        // The test binary is `loadtest-<hash>`; comm keeps 15 bytes of it.
        assert!(name.starts_with("loadtest"), "{name:?}");
    }

    #[test]
    fn missing_pid_is_an_error() {
        // Pids are below 2^22 on Linux.
        let pid = Pid::Other(u32::MAX);
        assert!(!pid.exists());
        assert!(rss_bytes(pid).is_err());
        assert!(cpu_time(pid).is_err());
    }

    #[test]
    fn snmp_udp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 2 3 90 3 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let m = parse_snmp_udp(snmp).expect("udp counters");
        assert_eq!(m.get("InDatagrams"), Some(&100));
        assert_eq!(m.get("RcvbufErrors"), Some(&3));
        assert_eq!(m.len(), 6);
        assert!(parse_snmp_udp("Ip: a\nIp: 1\n").is_none());
        // This machine's own counters, where /proc/net/snmp exists.
        if std::path::Path::new("/proc/net/snmp").exists() {
            assert!(udp_counters().is_some_and(|m| m.contains_key("InDatagrams")));
        }
    }

    #[test]
    fn cpuinfo_and_machine() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpuinfo(info), (2, "AMD EPYC 7B13".to_owned()));
        assert_eq!(parse_cpuinfo(""), (0, "unknown".to_owned()));
        assert_eq!(
            parse_loadavg("0.14 0.28 0.15 1/82 8743\n"),
            Some([0.14, 0.28, 0.15])
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
        assert_eq!(
            parse_open_files_limit(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        let m = Machine::probe();
        assert!(m.nproc >= 1);
        assert!(m.clk_tck > 0);
    }
}
