//! The signaling benchmark's report: the figures, the table and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::{secs, ConnOutcome, CpuSample, JoinResult, LeaveResult, SignalingArgs};
use crate::proc::Machine;
use crate::stats::{self, Summary};

fn ser_summary<S: Serializer>(s: &Summary, ser: S) -> Result<S::Ok, S::Error> {
    s.micros().serialize(ser)
}

/// The benchmark's results; serialized as the `--json` report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub url: String,
    pub run_id: String,
    /// False when the run hit `--timeout` before finishing.
    pub completed: bool,
    pub config: Config,
    pub machine: Machine,
    pub connections: Connections,
    pub pings: Pings,
    #[serde(serialize_with = "ser_summary")]
    pub handshake_latency: Summary,
    #[serde(serialize_with = "ser_summary")]
    pub join_latency: Summary,
    #[serde(serialize_with = "ser_summary")]
    pub ping_latency: Summary,
    /// Wall-clock seconds of each phase.
    pub phases: Phases,
    pub server: Option<ServerStats>,
    pub generator: Usage,
    /// Server messages received, by `type`, over all connections.
    pub messages_received: BTreeMap<String, u64>,
    /// Server `error` messages, by code.
    pub server_errors: BTreeMap<String, u64>,
    /// Connections by the first thing that went wrong.
    pub connection_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Config {
    pub connections: usize,
    pub rooms: usize,
    pub pings: u32,
    pub ping_interval_ms: f64,
    pub ping_timeout_ms: f64,
    pub join_timeout_ms: f64,
    pub timeout_s: f64,
    pub connect_concurrency: usize,
    pub threads: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Connections {
    pub requested: usize,
    /// WebSocket handshakes completed.
    pub established: usize,
    pub joined: usize,
    pub join_failed: usize,
    pub join_timeouts: usize,
    pub not_attempted: usize,
    /// Joined connections that broke before we closed them.
    pub lost: usize,
    pub leave_ok: usize,
    pub leave_failed: usize,
    pub leave_timeouts: usize,
    pub closed_cleanly: usize,
    /// Tasks that panicked or overran the hard deadline (outcome unknown).
    pub tasks_lost: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Pings {
    /// Joined connections × `--pings`.
    pub expected: u64,
    pub sent: u64,
    pub ok: u64,
    pub timeouts: u64,
    /// Not sent, or lost with a broken connection.
    pub failed: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Phases {
    pub connect_s: f64,
    pub ping_s: f64,
    pub close_s: f64,
    pub total_s: f64,
}

/// CPU seconds (user + system) per phase; `None` where /proc could not be read.
#[derive(Debug, Default, Serialize)]
pub struct Usage {
    pub cpu_connect_s: Option<f64>,
    pub cpu_ping_s: Option<f64>,
    pub cpu_close_s: Option<f64>,
    pub cpu_total_s: Option<f64>,
    /// `cpu_ping_s` as a percentage of one core over the ping phase.
    pub cpu_ping_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

impl Usage {
    /// From samples at start, joined, pinged and closed.
    pub(super) fn between(s: &[CpuSample; 4], get: fn(&CpuSample) -> Option<Duration>) -> Usage {
        let d = |a: usize, b: usize| Some(secs(get(&s[b])?.saturating_sub(get(&s[a])?)));
        let ping_wall = secs(s[2].at - s[1].at);
        Usage {
            cpu_connect_s: d(0, 1),
            cpu_ping_s: d(1, 2),
            cpu_close_s: d(2, 3),
            cpu_total_s: d(0, 3),
            cpu_ping_percent: d(1, 2)
                .filter(|_| ping_wall > 0.0)
                .map(|c| 100.0 * c / ping_wall),
            rss_bytes: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ServerStats {
    pub pid: u32,
    /// Command name of the process (`/proc/PID/comm`).
    pub name: Option<String>,
    /// Before the first connection.
    pub rss_baseline_bytes: Option<u64>,
    /// When every connection had joined.
    pub rss_after_join_bytes: Option<u64>,
    /// After the pings, every connection still open: the steady state.
    pub rss_steady_bytes: Option<u64>,
    /// Half a second after the last connection closed.
    pub rss_after_close_bytes: Option<u64>,
    /// (steady − baseline) / joined connections.
    pub rss_per_connection_bytes: Option<i64>,
    pub cpu: Usage,
}

impl Report {
    pub(super) fn assemble(
        args: &SignalingArgs,
        run_id: &str,
        machine: Machine,
        outcomes: &[ConnOutcome],
        tasks_lost: usize,
    ) -> Report {
        let mut c = Connections {
            requested: args.connections,
            tasks_lost,
            ..Connections::default()
        };
        let mut p = Pings::default();
        let (mut handshakes, mut joins, mut rtts) = (Vec::new(), Vec::new(), Vec::new());
        let mut received = BTreeMap::new();
        let mut server_errors = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for o in outcomes {
            if let Some(h) = o.handshake {
                c.established += 1;
                handshakes.push(h);
            }
            match o.join {
                JoinResult::Ok(d) => {
                    c.joined += 1;
                    joins.push(d);
                    p.expected += u64::from(args.pings);
                    c.lost += usize::from(o.lost);
                }
                JoinResult::Failed => c.join_failed += 1,
                JoinResult::TimedOut => c.join_timeouts += 1,
                JoinResult::NotAttempted => c.not_attempted += 1,
            }
            match o.leave {
                LeaveResult::Ok => c.leave_ok += 1,
                LeaveResult::Failed => c.leave_failed += 1,
                LeaveResult::TimedOut => c.leave_timeouts += 1,
                LeaveResult::NotAttempted => {}
            }
            c.closed_cleanly += usize::from(o.closed_cleanly);
            p.sent += u64::from(o.pings_sent);
            p.ok += o.rtts.len() as u64;
            p.timeouts += u64::from(o.ping_timeouts);
            p.failed += u64::from(o.ping_failed);
            rtts.extend_from_slice(&o.rtts);
            for (ty, n) in &o.received {
                *received.entry((*ty).to_owned()).or_default() += n;
            }
            for (code, n) in &o.server_errors {
                *server_errors.entry((*code).to_owned()).or_default() += n;
            }
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_default() += 1;
            }
        }
        Report {
            tool: "loadtest signaling",
            url: args.url.clone(),
            run_id: run_id.to_owned(),
            completed: false,
            config: Config {
                connections: args.connections,
                rooms: args.rooms,
                pings: args.pings,
                ping_interval_ms: args.ping_interval.as_secs_f64() * 1e3,
                ping_timeout_ms: args.ping_timeout.as_secs_f64() * 1e3,
                join_timeout_ms: args.join_timeout.as_secs_f64() * 1e3,
                timeout_s: args.timeout.as_secs_f64(),
                connect_concurrency: args.connect_concurrency,
                threads: args.threads.max(1),
            },
            machine,
            connections: c,
            pings: p,
            handshake_latency: Summary::of(&mut handshakes),
            join_latency: Summary::of(&mut joins),
            ping_latency: Summary::of(&mut rtts),
            phases: Phases::default(),
            server: None,
            generator: Usage::default(),
            messages_received: received,
            server_errors,
            connection_errors: errors,
        }
    }

    /// Every requested connection joined, answered every ping and left, and
    /// the run finished before `--timeout`. (A missing close handshake is
    /// reported but does not count.)
    pub fn all_ok(&self) -> bool {
        let c = &self.connections;
        self.completed
            && c.joined == c.requested
            && c.lost == 0
            && c.leave_ok == c.joined
            && self.pings.ok == self.pings.expected
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut t = String::new();
        self.write_table(&mut t)
            .expect("formatting into a String cannot fail");
        t
    }

    fn write_table(&self, t: &mut String) -> std::fmt::Result {
        let c = &self.connections;
        let p = &self.pings;
        let m = &self.machine;
        writeln!(t)?;
        writeln!(t, "Switchboard signaling benchmark")?;
        writeln!(t, "  url          {}", self.url)?;
        writeln!(
            t,
            "  run          {}  ({} connections, {} rooms, {} pings every {} ms, {} connecting at once{})",
            self.run_id,
            self.config.connections,
            self.config.rooms,
            self.config.pings,
            self.config.ping_interval_ms,
            self.config.connect_concurrency,
            if self.completed { "" } else { "; HIT --timeout" },
        )?;
        writeln!(
            t,
            "  machine      {} CPUs ({} online), {}; load avg {:.2} {:.2} {:.2} at start",
            m.nproc, m.cpus_online, m.cpu_model, m.loadavg[0], m.loadavg[1], m.loadavg[2]
        )?;
        writeln!(
            t,
            "  generator    tokio {}",
            if self.config.threads <= 1 {
                "current-thread runtime".to_owned()
            } else {
                format!("multi-thread runtime, {} workers", self.config.threads)
            }
        )?;
        writeln!(t)?;
        stats::write_latency_table(
            t,
            18,
            &[
                ("ws handshake".into(), &self.handshake_latency),
                ("join -> joined".into(), &self.join_latency),
                ("ping -> pong".into(), &self.ping_latency),
            ],
        )?;
        writeln!(t)?;
        writeln!(
            t,
            "  connections    {} requested, {} established, {} joined, {} join failed, \
             {} join timeouts, {} not attempted, {} lost",
            c.requested,
            c.established,
            c.joined,
            c.join_failed,
            c.join_timeouts,
            c.not_attempted,
            c.lost
        )?;
        writeln!(
            t,
            "  pings          {} expected, {} sent, {} ok, {} timeouts, {} failed",
            p.expected, p.sent, p.ok, p.timeouts, p.failed
        )?;
        writeln!(
            t,
            "  leave/close    {} leaved, {} failed, {} timeouts, {} closed cleanly{}",
            c.leave_ok,
            c.leave_failed,
            c.leave_timeouts,
            c.closed_cleanly,
            if c.tasks_lost > 0 {
                format!(", {} tasks lost", c.tasks_lost)
            } else {
                String::new()
            }
        )?;
        let ph = &self.phases;
        writeln!(
            t,
            "  phases (s)     connect+join {:.2} ({:.0} joins/s), pings {:.2} ({:.0} pongs/s), \
             leave+close {:.2}, total {:.2}",
            ph.connect_s,
            rate(c.joined as f64, ph.connect_s),
            ph.ping_s,
            rate(p.ok as f64, ph.ping_s),
            ph.close_s,
            ph.total_s
        )?;
        writeln!(t)?;
        if let Some(s) = &self.server {
            writeln!(
                t,
                "  server (pid {}, {})",
                s.pid,
                s.name.as_deref().unwrap_or("exited")
            )?;
            writeln!(
                t,
                "    RSS          baseline {}, after joins {}, steady {}, after close {}",
                mib(s.rss_baseline_bytes),
                mib(s.rss_after_join_bytes),
                mib(s.rss_steady_bytes),
                mib(s.rss_after_close_bytes)
            )?;
            writeln!(
                t,
                "    RSS/conn     {}  ((steady - baseline) / {} joined)",
                s.rss_per_connection_bytes
                    .map_or("n/a".into(), |b| format!("{:.1} KiB", b as f64 / 1024.0)),
                c.joined
            )?;
            write_usage(t, "    CPU         ", &s.cpu)?;
        } else {
            writeln!(
                t,
                "  server         (no --server-pid: RSS and CPU not sampled)"
            )?;
        }
        write_usage(t, "  generator CPU ", &self.generator)?;
        writeln!(t)?;
        writeln!(t, "  received       {}", join_map(&self.messages_received))?;
        if !self.server_errors.is_empty() {
            writeln!(t, "  server errors  {}", join_map(&self.server_errors))?;
        }
        if self.connection_errors.is_empty() {
            writeln!(t, "  conn errors    none")?;
        } else {
            writeln!(t, "  conn errors")?;
            for (e, n) in &self.connection_errors {
                writeln!(t, "    {n:>6}  {e}")?;
            }
        }
        writeln!(t)
    }
}

fn write_usage(t: &mut String, label: &str, u: &Usage) -> std::fmt::Result {
    let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2} s"));
    writeln!(
        t,
        "{label} connect {}, pings {} ({}), close {}, total {}",
        f(u.cpu_connect_s),
        f(u.cpu_ping_s),
        u.cpu_ping_percent
            .map_or("n/a".into(), |p| format!("{p:.1} % of a core")),
        f(u.cpu_close_s),
        f(u.cpu_total_s)
    )
}

fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        n / secs
    } else {
        0.0
    }
}

fn mib(b: Option<u64>) -> String {
    b.map_or("n/a".into(), |b| {
        format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
    })
}

fn join_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "nothing".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
