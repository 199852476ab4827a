//! The Janus benchmark's report. Field names match the `run` report's
//! where the figure is the same (`media[].loss_percent`, `latency_all`,
//! `server.cpu_per_forwarded_packet_us`, `server.rss_per_participant_bytes`,
//! ...), so `loadtest compare` reads both the same way.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use super::{kind_index, JanusArgs, MediaPlan, Outcome, Sample, Schedule, KIND_NAMES};
use crate::proc::{self, Machine};
use crate::publish::MediaSource;
use crate::rxstats::RtpStats;
use crate::stats::{self, Summary};

/// How the forwarded-packet count was obtained (Janus exposes none).
pub const FORWARDED_SOURCE: &str =
    "derived: distinct in-window packets the subscribers received (Janus has no counter; \
     in mix mode, the mixed packets delivered)";

fn ser_summary<S: Serializer>(s: &Summary, ser: S) -> Result<S::Ok, S::Error> {
    s.micros().serialize(ser)
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub url: String,
    pub run_id: String,
    /// Janus's `info.version_string`.
    pub server_version: String,
    pub completed: bool,
    pub config: Config,
    /// The media every publisher sent (the same as `loadtest run`'s).
    pub media_source: MediaSource,
    pub machine: Machine,
    pub participants: Participants,
    /// Join start → publisher and subscriber PeerConnections connected.
    #[serde(serialize_with = "ser_summary")]
    pub join_latency: Summary,
    pub window_s: f64,
    pub media: Vec<KindTotals>,
    #[serde(serialize_with = "ser_summary")]
    pub latency_all: Summary,
    #[serde(serialize_with = "ser_summary")]
    pub first_packet_after_warmup: Summary,
    #[serde(serialize_with = "ser_summary")]
    pub first_packet_after_join: Summary,
    /// Remote tracks opened on subscriber PeerConnections, and expected.
    pub tracks_added: usize,
    pub tracks_expected: usize,
    pub bad_payloads: BTreeMap<String, u64>,
    pub subscribers: Vec<SubscriberRow>,
    pub server: Option<ServerStats>,
    pub generator: GeneratorStats,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Config {
    pub rooms: usize,
    pub participants_per_room: usize,
    pub publishers_per_room: usize,
    pub audio_mode: super::AudioMode,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    /// `--video-kbps`, and whether Opus audio was published (`--audio`).
    pub video_kbps_target: u32,
    pub audio: bool,
    pub join_timeout_s: f64,
    pub connect_concurrency: usize,
    pub timeout_s: f64,
    pub threads: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Participants {
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub published: usize,
    pub dropped: usize,
    pub tasks_lost: usize,
}

#[derive(Debug, Serialize)]
pub struct KindTotals {
    pub kind: &'static str,
    pub sent: u64,
    pub sent_total: u64,
    pub send_errors: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_percent: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub tracks: usize,
    pub tracks_missing: usize,
    #[serde(serialize_with = "ser_summary")]
    pub latency: Summary,
    /// RFC 3550 interarrival jitter at the end of the run, over tracks.
    pub jitter_ms_mean: Option<f64>,
    pub jitter_ms_max: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SubscriberRow {
    pub name: String,
    pub feed: Option<u64>,
    pub room: usize,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_percent: f64,
    #[serde(serialize_with = "ser_summary")]
    pub latency: Summary,
    pub first_packet_max_ms: Option<f64>,
    /// Highest RFC 3550 jitter over this subscriber's tracks.
    pub jitter_ms_max: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ServerStats {
    pub pid: u32,
    pub name: Option<String>,
    pub cpu_window_s: Option<f64>,
    pub cpu_percent_of_core: Option<f64>,
    /// Window CPU / packets forwarded in the window.
    pub cpu_per_forwarded_packet_us: Option<f64>,
    /// Packets forwarded in the window, see `forwarded_source`.
    pub forwarded: u64,
    pub forwarded_source: &'static str,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_after_join_bytes: Option<u64>,
    pub rss_window_start_bytes: Option<u64>,
    pub rss_steady_bytes: Option<u64>,
    pub rss_after_leave_bytes: Option<u64>,
    /// (steady − baseline) / connected participants.
    pub rss_per_participant_bytes: Option<i64>,
}

#[derive(Debug, Default, Serialize)]
pub struct GeneratorStats {
    pub cpu_window_s: Option<f64>,
    pub cpu_percent_of_core: Option<f64>,
    pub cpu_per_packet_us: Option<f64>,
    pub rss_bytes: Option<u64>,
}

pub(super) struct Inputs<'a> {
    pub args: &'a JanusArgs,
    pub run_id: &'a str,
    pub janus_version: String,
    pub machine: Machine,
    pub plan: &'a MediaPlan,
    pub publishers: usize,
    pub outcomes: Vec<Outcome>,
    pub tasks_lost: usize,
    pub completed: bool,
    pub schedule: Option<Schedule>,
    pub baseline: Sample,
    pub after_join: Sample,
    pub window: Option<(Sample, Sample)>,
    pub finished: Sample,
}

#[derive(Debug, Default)]
struct KindAcc {
    expected: u64,
    received: u64,
    duplicates: u64,
    reordered: u64,
    tracks: usize,
    missing: usize,
    latencies: Vec<Duration>,
    jitters: Vec<f64>,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn ms_between(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

impl Report {
    pub(super) fn assemble(inp: Inputs<'_>) -> Report {
        let args = inp.args;
        let mut outcomes = inp.outcomes;
        outcomes.sort_by_key(|o| o.index);
        let by_index: HashMap<usize, &Outcome> = outcomes.iter().map(|o| (o.index, o)).collect();
        let kinds: Vec<usize> = inp.plan.kinds().into_iter().map(kind_index).collect();
        let mixed = args.audio_mode == super::AudioMode::Mix;

        let mut p = Participants {
            requested: args.rooms * args.participants,
            tasks_lost: inp.tasks_lost,
            ..Participants::default()
        };
        let mut joins = Vec::new();
        let mut errors = BTreeMap::new();
        let mut bad = BTreeMap::new();
        for o in &outcomes {
            if let (Some(s), Some(r)) = (o.join_started, o.ready_at) {
                p.connected += 1;
                joins.push(r - s);
            } else {
                p.failed += 1;
            }
            p.published += usize::from(o.published);
            let dropped = o.later_states.iter().any(|s| {
                s.starts_with("janus hangup")
                    || s.ends_with("failed")
                    || s.ends_with("disconnected")
                    || s.ends_with("closed")
            });
            p.dropped += usize::from(dropped && o.ready_at.is_some());
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_default() += 1;
            } else if dropped {
                *errors
                    .entry(format!("went {}", o.later_states.join(" → ")))
                    .or_default() += 1;
            }
            for (reason, n) in &o.bad {
                *bad.entry((*reason).to_owned()).or_default() += n;
            }
        }

        let mut subscribers = Vec::new();
        let mut per_kind: [KindAcc; 2] = Default::default();
        let (mut after_warmup, mut after_join) = (Vec::new(), Vec::new());
        let mut tracks_expected = 0usize;
        let mut tracks_added = 0usize;
        for sub in outcomes.iter().filter(|o| o.published) {
            let (mut s_expected, mut s_received) = (0u64, 0u64);
            let mut s_lat = Vec::new();
            let mut s_first_max: Option<f64> = None;
            let mut s_jitter: Vec<f64> = Vec::new();
            tracks_added += sub.tracks_added;
            if mixed {
                // One mixed stream per subscriber, counted by RTP sequence.
                let m = sub.mixed.as_ref();
                let (expected, received) = m.map_or((0, 0), |m| (m.expected(), m.received));
                let jitter = m.map(RtpStats::jitter_ms);
                let first_w = sub
                    .mixed_first_at
                    .zip(inp.schedule)
                    .map(|(at, s)| ms_between(s.warmup_start, at));
                let first_j = sub
                    .mixed_first_at
                    .zip(sub.join_started)
                    .map(|(at, j)| ms_between(j, at));
                if let Some(w) = first_w {
                    after_warmup.push(Duration::from_secs_f64(w / 1e3));
                }
                if let Some(j) = first_j {
                    after_join.push(Duration::from_secs_f64(j / 1e3));
                }
                tracks_expected += 1;
                let t = &mut per_kind[0];
                t.expected += expected;
                t.received += received;
                t.duplicates += m.map_or(0, |m| m.duplicates);
                t.reordered += m.map_or(0, |m| m.reordered);
                t.jitters.extend(jitter);
                t.tracks += 1;
                t.missing += usize::from(received == 0);
                let lost = expected.saturating_sub(received);
                subscribers.push(SubscriberRow {
                    name: sub.name.clone(),
                    feed: sub.feed,
                    room: sub.room,
                    expected,
                    received,
                    lost,
                    loss_percent: percent(lost, expected),
                    latency: Summary::default(),
                    first_packet_max_ms: first_w,
                    jitter_ms_max: jitter,
                    error: sub.error.clone(),
                });
                continue;
            }
            let members = (sub.room * args.participants)..((sub.room + 1) * args.participants);
            for pubi in members {
                let Some(publisher) = by_index.get(&pubi).filter(|o| o.published && o.publishes)
                else {
                    continue;
                };
                if pubi == sub.index {
                    continue;
                }
                for &k in &kinds {
                    tracks_expected += 1;
                    let sent = publisher.sent[k].window;
                    let flow = sub.flows.get(&(pubi, k));
                    let received = flow.map_or(0, |f| f.stamp.window);
                    let jitter = flow.map(|f| f.rtp.jitter_ms());
                    let first_w = flow
                        .and_then(|f| f.stamp.first_at)
                        .zip(inp.schedule)
                        .map(|(at, s)| ms_between(s.warmup_start, at));
                    let first_j = flow
                        .and_then(|f| f.stamp.first_at)
                        .zip(sub.join_started)
                        .map(|(at, j)| ms_between(j, at));
                    if let Some(w) = first_w {
                        after_warmup.push(Duration::from_secs_f64(w / 1e3));
                        s_first_max = Some(s_first_max.map_or(w, |m: f64| m.max(w)));
                    }
                    if let Some(j) = first_j {
                        after_join.push(Duration::from_secs_f64(j / 1e3));
                    }
                    let lat = flow.map(|f| f.stamp.latencies.clone()).unwrap_or_default();
                    let t = &mut per_kind[k];
                    t.expected += sent;
                    t.received += received;
                    t.duplicates += flow.map_or(0, |f| f.stamp.duplicates);
                    t.reordered += flow.map_or(0, |f| f.stamp.reordered);
                    t.jitters.extend(jitter);
                    s_jitter.extend(jitter);
                    t.tracks += 1;
                    t.missing += usize::from(sent > 0 && received == 0);
                    t.latencies.extend_from_slice(&lat);
                    s_lat.extend_from_slice(&lat);
                    s_expected += sent;
                    s_received += received;
                }
            }
            let lost = s_expected.saturating_sub(s_received);
            subscribers.push(SubscriberRow {
                name: sub.name.clone(),
                feed: sub.feed,
                room: sub.room,
                expected: s_expected,
                received: s_received,
                lost,
                loss_percent: percent(lost, s_expected),
                latency: Summary::of(&mut s_lat),
                first_packet_max_ms: s_first_max,
                jitter_ms_max: max(&s_jitter),
                error: sub.error.clone(),
            });
        }
        let mut all_lat = Vec::new();
        let mut media = Vec::new();
        let mut sent_window_total = 0u64;
        let mut received_total = 0u64;
        for &k in &kinds {
            let acc = &mut per_kind[k];
            all_lat.extend_from_slice(&acc.latencies);
            let sent: u64 = outcomes
                .iter()
                .filter(|o| o.published)
                .map(|o| o.sent[k].window)
                .sum();
            sent_window_total += sent;
            received_total += acc.received;
            let lost = acc.expected.saturating_sub(acc.received);
            media.push(KindTotals {
                kind: if mixed { "audio-mixed" } else { KIND_NAMES[k] },
                sent,
                sent_total: outcomes.iter().map(|o| o.sent[k].total).sum(),
                send_errors: outcomes.iter().map(|o| o.sent[k].errors).sum(),
                expected: acc.expected,
                received: acc.received,
                lost,
                loss_percent: percent(lost, acc.expected),
                duplicates: acc.duplicates,
                reordered: acc.reordered,
                tracks: acc.tracks,
                tracks_missing: acc.missing,
                latency: Summary::of(&mut acc.latencies),
                jitter_ms_mean: mean(&acc.jitters),
                jitter_ms_max: max(&acc.jitters),
            });
        }

        let window_s = inp
            .window
            .as_ref()
            .map_or(0.0, |(a, b)| (b.at - a.at).as_secs_f64());
        let cpu = |get: fn(&Sample) -> Option<Duration>| {
            let (a, b) = inp.window.as_ref()?;
            Some(get(b)?.saturating_sub(get(a)?).as_secs_f64())
        };
        let per_core = |c: Option<f64>| c.filter(|_| window_s > 0.0).map(|c| 100.0 * c / window_s);
        let server = args.server_pid.map(|pid| {
            let cpu_s = cpu(|s| s.server_cpu);
            let steady = inp.window.as_ref().and_then(|(_, b)| b.server_rss);
            let per_participant = match (inp.baseline.server_rss, steady) {
                (Some(b), Some(s)) if p.connected > 0 => {
                    Some((s as i64 - b as i64) / p.connected as i64)
                }
                _ => None,
            };
            ServerStats {
                pid,
                name: proc::comm(proc::Pid::Other(pid)).ok(),
                cpu_window_s: cpu_s,
                cpu_percent_of_core: per_core(cpu_s),
                cpu_per_forwarded_packet_us: cpu_s
                    .filter(|_| received_total > 0)
                    .map(|c| c * 1e6 / received_total as f64),
                forwarded: received_total,
                forwarded_source: FORWARDED_SOURCE,
                rss_baseline_bytes: inp.baseline.server_rss,
                rss_after_join_bytes: inp.after_join.server_rss,
                rss_window_start_bytes: inp.window.as_ref().and_then(|(a, _)| a.server_rss),
                rss_steady_bytes: steady,
                rss_after_leave_bytes: inp.finished.server_rss,
                rss_per_participant_bytes: per_participant,
            }
        });
        let own = cpu(|s| s.own_cpu);
        let handled = sent_window_total + received_total;
        let generator = GeneratorStats {
            cpu_window_s: own,
            cpu_percent_of_core: per_core(own),
            cpu_per_packet_us: own
                .filter(|_| handled > 0)
                .map(|c| c * 1e6 / handled as f64),
            rss_bytes: proc::rss_bytes(proc::Pid::Own).ok(),
        };

        Report {
            tool: "loadtest janus",
            url: args.url.clone(),
            run_id: inp.run_id.to_owned(),
            server_version: inp.janus_version,
            completed: inp.completed,
            config: Config {
                rooms: args.rooms,
                participants_per_room: args.participants,
                publishers_per_room: inp.publishers,
                audio_mode: args.audio_mode,
                duration_s: args.duration.as_secs_f64(),
                warmup_s: args.warmup.as_secs_f64(),
                drain_s: args.drain.as_secs_f64(),
                video_kbps_target: args.video_kbps,
                audio: args.audio,
                join_timeout_s: args.join_timeout.as_secs_f64(),
                connect_concurrency: args.connect_concurrency,
                timeout_s: args.timeout.as_secs_f64(),
                threads: args.threads.max(1),
            },
            media_source: inp.plan.source(),
            machine: inp.machine,
            participants: p,
            join_latency: Summary::of(&mut joins),
            window_s,
            media,
            latency_all: Summary::of(&mut all_lat),
            first_packet_after_warmup: Summary::of(&mut after_warmup),
            first_packet_after_join: Summary::of(&mut after_join),
            tracks_added,
            tracks_expected,
            bad_payloads: bad,
            subscribers,
            server,
            generator,
            errors,
        }
    }

    /// Every participant connected and stayed connected, every expected
    /// track delivered packets in the window, and the run finished in time.
    pub fn all_ok(&self) -> bool {
        let p = &self.participants;
        self.completed
            && p.connected == p.requested
            && p.published == p.requested
            && p.dropped == 0
            && p.tasks_lost == 0
            && self.media.iter().all(|m| m.tracks_missing == 0)
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        self.write_table(&mut t)
            .expect("formatting into a String cannot fail");
        t
    }

    fn write_table(&self, t: &mut String) -> std::fmt::Result {
        let c = &self.config;
        let m = &self.machine;
        let p = &self.participants;
        writeln!(t)?;
        match c.audio_mode {
            super::AudioMode::Forward => writeln!(t, "Janus VideoRoom forwarding benchmark")?,
            super::AudioMode::Mix => writeln!(
                t,
                "Janus AudioBridge mixing benchmark (expected/received: the mixed stream's \
                 RTP sequence numbers in the window; no end-to-end latency through a mixer)"
            )?,
        }
        writeln!(
            t,
            "  url          {} (Janus {})",
            self.url, self.server_version
        )?;
        writeln!(
            t,
            "  run          {}  ({} rooms x {} participants, {} publishing; warm-up {} s, window {} s, drain {} s{})",
            self.run_id,
            c.rooms,
            c.participants_per_room,
            c.publishers_per_room,
            c.warmup_s,
            c.duration_s,
            c.drain_s,
            if self.completed { "" } else { "; DID NOT COMPLETE" },
        )?;
        self.media_source.write_lines(t, c.video_kbps_target)?;
        writeln!(
            t,
            "  machine      {} CPUs ({} online), {}; load avg {:.2} {:.2} {:.2} at start",
            m.nproc, m.cpus_online, m.cpu_model, m.loadavg[0], m.loadavg[1], m.loadavg[2]
        )?;
        writeln!(
            t,
            "  participants {} requested, {} connected, {} failed, {} in the media phase, {} dropped{}",
            p.requested,
            p.connected,
            p.failed,
            p.published,
            p.dropped,
            if p.tasks_lost > 0 {
                format!(", {} tasks lost", p.tasks_lost)
            } else {
                String::new()
            }
        )?;
        writeln!(t)?;
        writeln!(
            t,
            "  media in the window ({:.2} s)   sent   expected   received       lost  loss %   dup  reord  tracks (missing)",
            self.window_s
        )?;
        for k in &self.media {
            writeln!(
                t,
                "    {:<28} {:>7} {:>10} {:>10} {:>10} {:>7.3} {:>5} {:>6}  {} ({})",
                k.kind,
                k.sent,
                k.expected,
                k.received,
                k.lost,
                k.loss_percent,
                k.duplicates,
                k.reordered,
                k.tracks,
                k.tracks_missing
            )?;
        }
        writeln!(
            t,
            "    tracks opened {} of {} expected{}",
            self.tracks_added,
            self.tracks_expected,
            if self.bad_payloads.is_empty() {
                String::new()
            } else {
                format!("; uncounted payloads: {:?}", self.bad_payloads)
            }
        )?;
        writeln!(t)?;
        let mut rows: Vec<(String, &Summary)> =
            vec![("join -> both PCs connected".into(), &self.join_latency)];
        for k in &self.media {
            rows.push((format!("end-to-end {}", k.kind), &k.latency));
        }
        rows.push(("end-to-end all".into(), &self.latency_all));
        rows.push((
            "warm-up start -> first pkt/track".into(),
            &self.first_packet_after_warmup,
        ));
        rows.push((
            "join -> first pkt/track".into(),
            &self.first_packet_after_join,
        ));
        stats::write_latency_table(t, 34, &rows)?;
        writeln!(t)?;
        match &self.server {
            Some(s) => {
                let opt = |v: Option<f64>, unit: &str| {
                    v.map_or("-".to_owned(), |v| format!("{v:.2} {unit}"))
                };
                writeln!(
                    t,
                    "  server (pid {}, {})",
                    s.pid,
                    s.name.as_deref().unwrap_or("exited")
                )?;
                writeln!(
                    t,
                    "    CPU in window        {}  ({} of one core)",
                    opt(s.cpu_window_s, "s"),
                    opt(s.cpu_percent_of_core, "%")
                )?;
                writeln!(
                    t,
                    "    CPU per packet       {} per forwarded RTP packet ({} forwarded, {})",
                    opt(s.cpu_per_forwarded_packet_us, "µs"),
                    s.forwarded,
                    s.forwarded_source
                )?;
                let mib = |b: Option<u64>| {
                    b.map_or("-".to_owned(), |b| {
                        format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
                    })
                };
                writeln!(
                    t,
                    "    RSS                  baseline {}, all connected {}, steady (window end) {}, after leaving {}",
                    mib(s.rss_baseline_bytes),
                    mib(s.rss_after_join_bytes),
                    mib(s.rss_steady_bytes),
                    mib(s.rss_after_leave_bytes)
                )?;
                writeln!(
                    t,
                    "    RSS/participant      {}  ((steady - baseline) / {} connected)",
                    s.rss_per_participant_bytes
                        .map_or("-".to_owned(), |b| format!("{:.1} KiB", b as f64 / 1024.0)),
                    p.connected
                )?;
            }
            None => writeln!(
                t,
                "  server               (no --server-pid: CPU and RSS not sampled)"
            )?,
        }
        let g = &self.generator;
        writeln!(
            t,
            "  generator          CPU {} s in window ({} % of one core)",
            g.cpu_window_s.map_or("-".into(), |v| format!("{v:.2}")),
            g.cpu_percent_of_core
                .map_or("-".into(), |v| format!("{v:.1}"))
        )?;
        if !self.errors.is_empty() {
            writeln!(t)?;
            writeln!(t, "  participant errors")?;
            for (e, n) in &self.errors {
                writeln!(t, "    {n:>5}  {e}")?;
            }
        }
        Ok(())
    }
}
