//! `loadtest run`'s report: the figures, the table and the JSON.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use super::{kind_index, MediaPlan, Outcome, RunArgs, Sample, Schedule, KIND_NAMES};
use crate::plot::Point;
use crate::proc::{self, Machine};
use crate::publish::MediaSource;
use crate::rxstats::{percent, RtpStats};
use crate::sampler::{self, Tick};
use crate::scrape::{self, Estimate, Histogram};
use crate::stats::{self, Summary};
use switchboard_client::LightCounts;

/// The server's forwarding counter and latency histogram.
pub const FORWARDED: &str = "switchboard_media_rtp_forwarded_total";
pub const FORWARD_LATENCY: &str = "switchboard_media_forward_latency_seconds";
const DATAGRAMS_IN: &str = "switchboard_media_datagrams_received_total";
const DATAGRAMS_OUT: &str = "switchboard_media_datagrams_sent_total";

fn ser_summary<S: Serializer>(s: &Summary, ser: S) -> Result<S::Ok, S::Error> {
    s.micros().serialize(ser)
}

/// The benchmark's results; serialized as the `--json` report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub url: String,
    pub run_id: String,
    /// False when the run hit `--timeout` or lost a task.
    pub completed: bool,
    pub config: Config,
    /// What is published, and how it is paced and stamped.
    pub media_source: MediaSource,
    /// The `audio` mode each participant's `joined` reported, by mode.
    pub audio_mode_granted: BTreeMap<String, u64>,
    pub machine: Machine,
    pub participants: Participants,
    /// Join start → connected and negotiated.
    #[serde(serialize_with = "ser_summary")]
    pub join_latency: Summary,
    /// Wall-clock seconds between the samples at both ends of the window.
    pub window_s: f64,
    /// Per kind, over the window.
    pub media: Vec<KindTotals>,
    /// End-to-end latency of every in-window packet, both kinds.
    #[serde(serialize_with = "ser_summary")]
    pub latency_all: Summary,
    /// Per remote track: warm-up start (publishing begins) → first packet.
    #[serde(serialize_with = "ser_summary")]
    pub first_packet_after_warmup: Summary,
    /// Per remote track: the subscriber's join start → first packet.
    #[serde(serialize_with = "ser_summary")]
    pub first_packet_after_join: Summary,
    /// Remote tracks announced (`TrackAdded`) over all subscribers, and the
    /// number expected.
    pub tracks_added: usize,
    pub tracks_expected: usize,
    pub tracks_removed: u64,
    /// Payloads that could not be counted, by reason.
    pub bad_payloads: BTreeMap<String, u64>,
    /// The server's mixed-audio tracks (stream id `mix`), when it sent any.
    pub mixed_audio: Option<MixedAudio>,
    pub subscribers: Vec<SubscriberRow>,
    pub flows: Vec<FlowRow>,
    /// One point per sampling interval (about a second) from the start of
    /// publishing to the end of the drain.
    pub timeline: Vec<TimePoint>,
    pub server: Option<ServerStats>,
    pub server_metrics: Option<ServerMetrics>,
    pub generator: GeneratorStats,
    /// Deltas of the kernel's UDP counters over the window (system-wide).
    pub kernel_udp: BTreeMap<String, i64>,
    /// Participants by the first thing that went wrong.
    pub errors: BTreeMap<String, u64>,
    /// Server `error` messages, by code.
    pub server_errors: BTreeMap<String, u64>,
    /// `--simulcast`: what went on the lower layers.
    pub simulcast: Option<SimulcastStats>,
    /// `--light-subscribers`: what the light subscribers counted (then
    /// `media[].received`, the flows and end-to-end latency are empty, and
    /// `subscribers[].received` is the light count).
    pub light: Option<LightStats>,
}

/// `--light-subscribers`: SRTP datagrams counted from their cleartext
/// header, not decrypted.
#[derive(Debug, Serialize)]
pub struct LightStats {
    pub note: &'static str,
    /// Subscribers that took part in the media phase.
    pub subscribers: usize,
    /// Distinct (SSRC, sequence number) packets that arrived inside the
    /// window, over all subscribers: the forwarded packets.
    pub counted: u64,
    pub counted_per_s: f64,
    pub counted_bytes: u64,
    /// Σ over subscribers of what the room's other publishers sent in the
    /// window: what the subscribers should have counted.
    pub expected: u64,
    /// Σ over subscribers of what the room's other publishers sent over
    /// the whole media phase: distinct counting cannot exceed it.
    pub sent_bound: u64,
    pub lost: u64,
    pub loss_percent: f64,
    /// In-window arrivals of a packet already counted.
    pub duplicates: u64,
    /// Too far behind their SSRC's highest sequence number to tell.
    pub stale: u64,
    /// RTX payload type (retransmissions, probe padding): not counted.
    pub rtx: u64,
    pub untracked: u64,
    pub malformed: u64,
    /// Every SRTP datagram the light subscribers took (any time).
    pub rtp_datagrams: u64,
    /// Mean datagrams per `recvmmsg` call that returned any.
    pub mean_batch: Option<f64>,
    /// SSRCs with in-window packets, over subscribers, and the number
    /// expected (one per other publisher and kind); subscribers that saw
    /// fewer than they should.
    pub ssrcs_seen: u64,
    pub ssrcs_expected: u64,
    pub subscribers_short: usize,
}

/// `--simulcast`: the lower layers (the top layer is counted as video
/// everywhere else in the report).
#[derive(Debug, Serialize)]
pub struct SimulcastStats {
    pub rids: [&'static str; 3],
    /// Picture sizes the lower layers' keyframes declare (q, h).
    pub lower_sizes: [(u16, u16); 2],
    /// Lower-layer packets the publishers handed to their clients, per layer (q, h).
    pub lower_sent: [u64; 2],
    /// Lower-layer packets the subscribers received, per layer (q, h).
    pub lower_received: [u64; 2],
    /// `publisher-layers` messages the publishers received.
    pub publisher_layers_messages: u64,
    /// Whether the publishers obeyed them (not `--ignore-dynacast`).
    pub dynacast: bool,
    /// Of those messages, the ones that turned a layer off or on.
    pub layer_changes: u64,
}

#[derive(Debug, Serialize)]
pub struct Config {
    pub rooms: usize,
    pub participants_per_room: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub publishers_per_room: usize,
    pub video_kbps_target: u32,
    pub audio: bool,
    pub audio_mode_requested: &'static str,
    pub join_timeout_s: f64,
    pub connect_concurrency: usize,
    pub timeout_s: f64,
    pub threads: usize,
    /// `--light-subscribers`: receivers count SRTP headers, no decryption.
    pub light_subscribers: bool,
}

/// Mixed audio: re-encoded by the server, so no stamp survives; counted by
/// RTP sequence numbers and timestamps only, from the window start to the
/// end of the drain. No end-to-end latency.
#[derive(Debug, Serialize)]
pub struct MixedAudio {
    pub note: &'static str,
    /// Subscribers that received a `mix` track, of those that took part.
    pub subscribers: usize,
    pub subscribers_expected: usize,
    pub received: u64,
    pub received_bytes: u64,
    /// From RTP sequence numbers (first to last seen, per track).
    pub rtp_expected: u64,
    pub rtp_lost: u64,
    pub loss_percent: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub jitter_ms_mean: Option<f64>,
    pub jitter_ms_max: Option<f64>,
    /// Subscriber's join start → first mixed packet.
    #[serde(serialize_with = "ser_summary")]
    pub first_packet_after_join: Summary,
}

/// One sampling interval.
#[derive(Debug, Serialize)]
pub struct TimePoint {
    /// End of the interval, seconds since publishing began.
    pub t_s: f64,
    pub seconds: f64,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    pub forwarded_per_s: Option<f64>,
    pub server_cpu_per_forwarded_packet_us: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
    /// Stamped in-window packets that arrived in the interval, and their
    /// end-to-end latency.
    pub packets_received: usize,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Participants {
    pub requested: usize,
    /// Connected and negotiated.
    pub connected: usize,
    pub failed: usize,
    /// Published in the media phase.
    pub published: usize,
    /// Lost signaling or media connection after connecting.
    pub dropped: usize,
    /// Tasks that panicked or overran the hard deadline (outcome unknown).
    pub tasks_lost: usize,
}

#[derive(Debug, Serialize)]
pub struct KindTotals {
    pub kind: &'static str,
    /// Packets published in the window, all publishers.
    pub sent: u64,
    /// RTP payload bytes published in the window (media, descriptor, stamp).
    pub sent_bytes: u64,
    /// Achieved payload rate per publisher over the window, kbit/s.
    pub sent_kbps_per_publisher: f64,
    /// Frames per second per publisher, and keyframes, in the window.
    pub frames_per_s_per_publisher: f64,
    pub keyframes: u64,
    /// Packets published over the whole media phase (warm-up included).
    pub sent_total: u64,
    pub send_errors: u64,
    /// In-window packets every subscriber should get: Σ sent × subscribers.
    pub expected: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub lost: u64,
    pub loss_percent: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// By RTP sequence numbers (as the server rewrote them) of the packets
    /// sent in the window: the first to the last one received per flow.
    pub rtp_expected: u64,
    pub rtp_lost: u64,
    /// RFC 3550 interarrival jitter at the end of the run, over flows.
    pub jitter_ms_mean: Option<f64>,
    pub jitter_ms_max: Option<f64>,
    /// (subscriber, publisher) pairs expected, and those with no packet in the window.
    pub tracks: usize,
    pub tracks_missing: usize,
    #[serde(serialize_with = "ser_summary")]
    pub latency: Summary,
}

#[derive(Debug, Serialize)]
pub struct SubscriberRow {
    pub name: String,
    pub id: Option<String>,
    pub room: usize,
    pub expected: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub lost: u64,
    pub loss_percent: f64,
    /// Highest RFC 3550 jitter over this subscriber's tracks.
    pub jitter_ms_max: Option<f64>,
    #[serde(serialize_with = "ser_summary")]
    pub latency: Summary,
    /// The mixed-audio track, if any: packets, RTP loss, jitter.
    pub mix_received: Option<u64>,
    pub mix_lost: Option<u64>,
    pub mix_jitter_ms: Option<f64>,
    /// Slowest remote track: warm-up start → first packet, ms.
    pub first_packet_max_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub subscriber: String,
    pub publisher: String,
    pub kind: &'static str,
    pub sent: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub rtp_expected: u64,
    pub rtp_lost: u64,
    pub jitter_ms: Option<f64>,
    pub first_packet_after_warmup_ms: Option<f64>,
    pub first_packet_after_join_ms: Option<f64>,
    #[serde(serialize_with = "ser_summary")]
    pub latency: Summary,
}

#[derive(Debug, Serialize)]
pub struct ServerStats {
    pub pid: u32,
    /// Command name of the process (`/proc/PID/comm`).
    pub name: Option<String>,
    /// utime + stime over the window.
    pub cpu_window_s: Option<f64>,
    pub cpu_percent_of_core: Option<f64>,
    /// Window CPU / RTP packets forwarded in the window: by the server's
    /// counter, or with `--light-subscribers` by the distinct in-window
    /// packets the subscribers counted (`cpu_per_forwarded_packet_basis`).
    pub cpu_per_forwarded_packet_us: Option<f64>,
    pub cpu_per_forwarded_packet_basis: &'static str,
    /// Window CPU / media datagrams received in the window.
    pub cpu_per_received_datagram_us: Option<f64>,
    /// Window CPU by thread name, % of one core (the media workers are
    /// `sfu-media-N`).
    pub thread_cpu_percent: BTreeMap<String, f64>,
    /// Before anyone joined.
    pub rss_baseline_bytes: Option<u64>,
    /// Everyone connected, no media yet.
    pub rss_after_join_bytes: Option<u64>,
    /// Start of the window (after the warm-up).
    pub rss_window_start_bytes: Option<u64>,
    /// End of the window.
    pub rss_steady_bytes: Option<u64>,
    /// After everyone left.
    pub rss_after_leave_bytes: Option<u64>,
    /// (steady − baseline) / connected participants.
    pub rss_per_participant_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ServerMetrics {
    /// `switchboard_media_rtp_forwarded_total` over the window.
    pub forwarded: f64,
    pub forwarded_per_s: f64,
    /// What the generator's counts say should have been forwarded
    /// (Σ sent in the window × other participants in the room).
    pub expected_forwarded: u64,
    pub datagrams_in: Option<f64>,
    pub datagrams_out: Option<f64>,
    pub forward_latency: Option<LatencyHistogram>,
    /// Every `switchboard_*_total` series that changed over the window.
    pub counters: BTreeMap<String, f64>,
}

/// The server's forwarding-latency histogram over the window (one
/// observation per incoming RTP packet: arrival → last copy queued with
/// rtc; the outbound interceptors, SRTP encryption and `sendto` happen at the
/// next flush and are not included).
#[derive(Debug, Serialize)]
pub struct LatencyHistogram {
    pub observations: f64,
    pub mean_s: Option<f64>,
    pub p50: Option<Estimate>,
    pub p90: Option<Estimate>,
    pub p99: Option<Estimate>,
    pub p999: Option<Estimate>,
    /// Share of the observations in the lowest bucket (where quantiles
    /// cannot be resolved), percent.
    pub lowest_bucket_percent: Option<f64>,
    /// Highest bucket bound with an observation in it (`+Inf` → `None`).
    pub max_bucket_s: Option<f64>,
    /// `(le seconds or "+Inf", cumulative count)` over the window.
    pub buckets: Vec<(String, f64)>,
}

#[derive(Debug, Default, Serialize)]
pub struct GeneratorStats {
    pub cpu_window_s: Option<f64>,
    pub cpu_percent_of_core: Option<f64>,
    /// Window CPU / (packets sent + received in the window).
    pub cpu_per_packet_us: Option<f64>,
    pub rss_bytes: Option<u64>,
}

/// What [`Report::assemble`] is built from.
pub(super) struct Inputs<'a> {
    pub args: &'a RunArgs,
    pub run_id: &'a str,
    pub machine: Machine,
    pub plan: &'a MediaPlan,
    pub base: Instant,
    pub outcomes: Vec<Outcome>,
    pub tasks_lost: usize,
    pub completed: bool,
    pub schedule: Option<Schedule>,
    pub baseline: Sample,
    pub after_join: Sample,
    pub joined_at: Instant,
    pub window: Option<(Sample, Sample)>,
    pub finished: Sample,
    pub ticks: Vec<Tick>,
}

/// Totals of one kind over every (subscriber, publisher) pair.
#[derive(Debug, Default)]
struct KindAcc {
    expected: u64,
    received: u64,
    bytes: u64,
    duplicates: u64,
    reordered: u64,
    rtp_expected: u64,
    rtp_lost: u64,
    jitters: Vec<f64>,
    tracks: usize,
    missing: usize,
    latencies: Vec<Duration>,
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

impl Report {
    pub(super) fn assemble(inp: Inputs<'_>) -> Report {
        let args = inp.args;
        let mut outcomes = inp.outcomes;
        outcomes.sort_by_key(|o| o.index);
        let by_index: HashMap<usize, &Outcome> = outcomes.iter().map(|o| (o.index, o)).collect();
        let id_to_index: HashMap<&str, usize> = outcomes
            .iter()
            .filter_map(|o| Some((o.id.as_deref()?, o.index)))
            .collect();
        let kinds: Vec<usize> = inp.plan.kinds().into_iter().map(kind_index).collect();

        let mut p = Participants {
            requested: args.rooms * args.participants,
            tasks_lost: inp.tasks_lost,
            ..Participants::default()
        };
        let mut joins = Vec::new();
        let mut errors = BTreeMap::new();
        let mut server_errors = BTreeMap::new();
        let mut bad = BTreeMap::new();
        for o in &outcomes {
            if let (Some(s), Some(r)) = (o.join_started, o.ready_at) {
                p.connected += 1;
                joins.push(r - s);
            } else {
                p.failed += 1;
            }
            p.published += usize::from(o.published);
            let dropped = o.closed_early
                || o.later_states
                    .iter()
                    .any(|s| matches!(s.as_str(), "failed" | "disconnected" | "closed"));
            p.dropped += usize::from(dropped && o.ready_at.is_some());
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_default() += 1;
            } else if dropped {
                let states = o.later_states.join(" → ");
                *errors
                    .entry(format!("connection went {states}"))
                    .or_default() += 1;
            }
            for (code, n) in &o.server_errors {
                *server_errors.entry(code.clone()).or_default() += n;
            }
            for (reason, n) in &o.bad {
                *bad.entry((*reason).to_owned()).or_default() += n;
            }
        }

        // Per flow: every published stream of every other publisher in the
        // room; mixed audio replaces the audio flows of a subscriber that
        // got a `mix` track.
        let mut flows = Vec::new();
        let mut subscribers = Vec::new();
        let mut per_kind: [KindAcc; 2] = Default::default();
        let (mut after_warmup, mut after_join) = (Vec::new(), Vec::new());
        let mut tracks_expected = 0usize;
        let mut tracks_added = 0usize;
        let mut tracks_removed = 0u64;
        let mut mix_stats: Vec<&RtpStats> = Vec::new();
        let mut mix_first = Vec::new();
        let mut mix_missing = 0usize;
        let mut audio_mode_granted = BTreeMap::new();
        let mix_requested = args.audio_mode == super::AudioModeArg::Mix;
        for o in &outcomes {
            if let Some(m) = o.audio_mode {
                *audio_mode_granted
                    .entry(m.as_str().to_owned())
                    .or_insert(0u64) += 1;
            }
        }
        let publishers_per_room = args.publishers();
        let light = args.light_subscribers;
        let (mut light_bound, mut ssrcs_expected, mut subscribers_short) = (0u64, 0u64, 0usize);
        for sub in outcomes.iter().filter(|o| o.published) {
            let (mut s_expected, mut s_received, mut s_bytes) = (0u64, 0u64, 0u64);
            let (mut s_bound, mut s_ssrcs) = (0u64, 0u64);
            let mut s_lat = Vec::new();
            let mut s_jitter: Vec<f64> = Vec::new();
            let mut s_first_max: Option<f64> = None;
            tracks_removed += sub.tracks_removed;
            tracks_added += sub
                .tracks_added
                .keys()
                .filter(|(id, _)| {
                    id_to_index.contains_key(id.as_str()) || id == super::MIX_STREAM_ID
                })
                .count();
            // Mixed audio expected when asked for and the server sent it.
            let has_mix = sub.mix_first_at.is_some();
            if kinds.contains(&0) && (has_mix || mix_requested) {
                let others = (0..publishers_per_room)
                    .filter(|j| sub.room * args.participants + j != sub.index)
                    .count();
                if has_mix && others > 0 {
                    tracks_expected += 1;
                    match &sub.mix {
                        Some(m) => {
                            mix_stats.push(m);
                            s_jitter.push(m.jitter_ms());
                        }
                        None => mix_missing += 1,
                    }
                    if let (Some(at), Some(j)) = (sub.mix_first_at, sub.join_started) {
                        mix_first.push(at.saturating_duration_since(j));
                    }
                }
            }
            let room_members = (sub.room * args.participants)..((sub.room + 1) * args.participants);
            for pubi in room_members {
                let Some(publisher) = by_index.get(&pubi).filter(|o| o.published && o.publisher)
                else {
                    continue;
                };
                if pubi == sub.index {
                    continue;
                }
                for &k in &kinds {
                    if k == 0 && has_mix {
                        continue;
                    }
                    tracks_expected += 1;
                    let sent = publisher.sent[k].window;
                    let flow = sub.flows.get(&(pubi, k));
                    let received = flow.map_or(0, |f| f.stamp.window);
                    let lost = sent.saturating_sub(received);
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
                    let mut lat = flow.map(|f| f.stamp.latencies.clone()).unwrap_or_default();
                    let rtp = flow.map(|f| &f.rtp).filter(|r| r.received > 0);
                    let jitter = rtp.map(RtpStats::jitter_ms);
                    let bytes = rtp.map_or(0, |r| r.bytes);
                    let t = &mut per_kind[k];
                    t.expected += sent;
                    t.received += received;
                    t.bytes += bytes;
                    t.duplicates += flow.map_or(0, |f| f.stamp.duplicates);
                    t.reordered += flow.map_or(0, |f| f.stamp.reordered);
                    t.rtp_expected += rtp.map_or(0, RtpStats::expected);
                    t.rtp_lost += rtp.map_or(0, RtpStats::lost);
                    t.jitters.extend(jitter);
                    s_jitter.extend(jitter);
                    t.tracks += 1;
                    s_bound += publisher.sent[k].total;
                    s_ssrcs += u64::from(sent > 0);
                    if light {
                        // Counted per subscriber, not per flow (below).
                        s_expected += sent;
                        continue;
                    }
                    t.missing += usize::from(sent > 0 && received == 0);
                    t.latencies.extend_from_slice(&lat);
                    s_lat.extend_from_slice(&lat);
                    s_expected += sent;
                    s_received += received;
                    s_bytes += bytes;
                    flows.push(FlowRow {
                        subscriber: sub.name.clone(),
                        publisher: publisher.name.clone(),
                        kind: KIND_NAMES[k],
                        sent,
                        received,
                        received_bytes: bytes,
                        lost,
                        duplicates: flow.map_or(0, |f| f.stamp.duplicates),
                        reordered: flow.map_or(0, |f| f.stamp.reordered),
                        rtp_expected: rtp.map_or(0, RtpStats::expected),
                        rtp_lost: rtp.map_or(0, RtpStats::lost),
                        jitter_ms: jitter,
                        first_packet_after_warmup_ms: first_w,
                        first_packet_after_join_ms: first_j,
                        latency: Summary::of(&mut lat),
                    });
                }
            }
            if let (true, Some(c)) = (light, sub.light_counts.as_ref()) {
                s_received = c.window_distinct;
                s_bytes = c.window_bytes;
                subscribers_short += usize::from(c.window_ssrcs < s_ssrcs);
            } else if light {
                subscribers_short += 1;
            }
            light_bound += s_bound;
            ssrcs_expected += s_ssrcs;
            let lost = s_expected.saturating_sub(s_received);
            subscribers.push(SubscriberRow {
                name: sub.name.clone(),
                id: sub.id.clone(),
                room: sub.room,
                expected: s_expected,
                received: s_received,
                received_bytes: s_bytes,
                lost,
                loss_percent: percent(lost, s_expected),
                jitter_ms_max: max(&s_jitter),
                latency: Summary::of(&mut s_lat),
                mix_received: sub.mix.as_ref().map(|m| m.received),
                mix_lost: sub.mix.as_ref().map(RtpStats::lost),
                mix_jitter_ms: sub.mix.as_ref().map(RtpStats::jitter_ms),
                first_packet_max_ms: s_first_max,
                error: sub.error.clone(),
            });
        }
        let mixed_audio = (!mix_stats.is_empty() || mix_missing > 0).then(|| {
            let jit: Vec<f64> = mix_stats.iter().map(|m| m.jitter_ms()).collect();
            let expected: u64 = mix_stats.iter().map(|m| m.expected()).sum();
            let lost: u64 = mix_stats.iter().map(|m| m.lost()).sum();
            MixedAudio {
                note: "re-encoded by the server: counted by RTP sequence numbers and \
                       timestamps only (packets, loss, jitter); no end-to-end latency",
                subscribers: mix_stats.len(),
                subscribers_expected: mix_stats.len() + mix_missing,
                received: mix_stats.iter().map(|m| m.received).sum(),
                received_bytes: mix_stats.iter().map(|m| m.bytes).sum(),
                rtp_expected: expected,
                rtp_lost: lost,
                loss_percent: percent(lost, expected),
                duplicates: mix_stats.iter().map(|m| m.duplicates).sum(),
                reordered: mix_stats.iter().map(|m| m.reordered).sum(),
                jitter_ms_mean: mean(&jit),
                jitter_ms_max: max(&jit),
                first_packet_after_join: Summary::of(&mut mix_first),
            }
        });
        let publishing = outcomes
            .iter()
            .filter(|o| o.published && o.publisher)
            .count();
        let mut all_lat = Vec::new();
        let mut media = Vec::new();
        let mut sent_window_total = 0u64;
        let mut received_total = 0u64;
        let window_len = args.duration.as_secs_f64();
        for &k in &kinds {
            let acc = &mut per_kind[k];
            all_lat.extend_from_slice(&acc.latencies);
            let publishers = || outcomes.iter().filter(|o| o.published && o.publisher);
            let sent: u64 = publishers().map(|o| o.sent[k].window).sum();
            let sent_bytes: u64 = publishers().map(|o| o.sent[k].window_bytes).sum();
            let frames: u64 = publishers().map(|o| o.sent[k].window_frames).sum();
            let per_pub = |x: f64| {
                if publishing > 0 && window_len > 0.0 {
                    x / publishing as f64 / window_len
                } else {
                    0.0
                }
            };
            sent_window_total += sent;
            received_total += acc.received;
            let lost = acc.expected.saturating_sub(acc.received);
            media.push(KindTotals {
                kind: KIND_NAMES[k],
                sent,
                sent_bytes,
                sent_kbps_per_publisher: per_pub(sent_bytes as f64 * 8.0 / 1e3),
                frames_per_s_per_publisher: per_pub(frames as f64),
                keyframes: publishers().map(|o| o.sent[k].window_keyframes).sum(),
                sent_total: outcomes.iter().map(|o| o.sent[k].total).sum(),
                send_errors: outcomes.iter().map(|o| o.sent[k].errors).sum(),
                expected: acc.expected,
                received: acc.received,
                received_bytes: acc.bytes,
                lost,
                loss_percent: percent(lost, acc.expected),
                duplicates: acc.duplicates,
                reordered: acc.reordered,
                rtp_expected: acc.rtp_expected,
                rtp_lost: acc.rtp_lost,
                jitter_ms_mean: mean(&acc.jitters),
                jitter_ms_max: max(&acc.jitters),
                tracks: acc.tracks,
                tracks_missing: acc.missing,
                latency: Summary::of(&mut acc.latencies),
            });
        }
        // The time series: the sampler's intervals, with the latency of the
        // stamped packets that arrived in each.
        let timeline = match inp.schedule {
            Some(s) => {
                let mut arrivals: Vec<(u32, u32)> = outcomes
                    .iter()
                    .flat_map(|o| o.timeline.iter().copied())
                    .collect();
                arrivals.sort_unstable();
                let mut from_ms = 0u32;
                sampler::intervals(&inp.ticks, s.warmup_start)
                    .into_iter()
                    .map(|iv| {
                        let to_ms = (iv.t_s * 1e3) as u32;
                        let lo = arrivals.partition_point(|(t, _)| *t < from_ms);
                        let hi = arrivals.partition_point(|(t, _)| *t < to_ms);
                        from_ms = to_ms;
                        let mut lat: Vec<Duration> = arrivals[lo..hi]
                            .iter()
                            .map(|(_, us)| Duration::from_micros(u64::from(*us)))
                            .collect();
                        let n = lat.len();
                        let sum = Summary::of(&mut lat);
                        TimePoint {
                            t_s: iv.t_s,
                            seconds: iv.seconds,
                            server_cpu_percent: iv.server_cpu_percent,
                            server_rss_bytes: iv.server_rss_bytes,
                            forwarded_per_s: iv.counter_per_s,
                            server_cpu_per_forwarded_packet_us: iv.server_cpu_per_count_us,
                            generator_cpu_percent: iv.generator_cpu_percent,
                            packets_received: n,
                            latency_p50_ms: (n > 0).then_some(sum.p50.as_secs_f64() * 1e3),
                            latency_p99_ms: (n > 0).then_some(sum.p99.as_secs_f64() * 1e3),
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let expected_forwarded: u64 = media.iter().map(|m| m.expected).sum();
        let window_s = inp
            .window
            .as_ref()
            .map_or(0.0, |(a, b)| (b.at - a.at).as_secs_f64());
        let light = light.then(|| {
            let subs: Vec<&LightCounts> = outcomes
                .iter()
                .filter(|o| o.published)
                .filter_map(|o| o.light_counts.as_ref())
                .collect();
            let sum = |f: fn(&LightCounts) -> u64| subs.iter().copied().map(f).sum::<u64>();
            let counted = sum(|c| c.window_distinct);
            let lost = expected_forwarded.saturating_sub(counted);
            let calls = sum(|c| c.recv_calls);
            LightStats {
                note: "SRTP not decrypted: distinct (SSRC, seq) packets that arrived inside \
                       the window, read from the cleartext header; no end-to-end latency, \
                       per-flow loss or jitter",
                subscribers: outcomes.iter().filter(|o| o.published).count(),
                counted,
                counted_per_s: if window_s > 0.0 {
                    counted as f64 / window_s
                } else {
                    0.0
                },
                counted_bytes: sum(|c| c.window_bytes),
                expected: expected_forwarded,
                sent_bound: light_bound,
                lost,
                loss_percent: percent(lost, expected_forwarded),
                duplicates: sum(|c| c.window_duplicates),
                stale: sum(|c| c.stale),
                rtx: sum(|c| c.rtx),
                untracked: sum(|c| c.untracked),
                malformed: sum(|c| c.malformed),
                rtp_datagrams: sum(|c| c.rtp_datagrams),
                mean_batch: (calls > 0).then(|| sum(|c| c.recv_datagrams) as f64 / calls as f64),
                ssrcs_seen: sum(|c| c.window_ssrcs),
                ssrcs_expected,
                subscribers_short,
            }
        });

        // Server and generator over the window.
        let cpu = |get: fn(&Sample) -> Option<Duration>| {
            let (a, b) = inp.window.as_ref()?;
            Some(get(b)?.saturating_sub(get(a)?).as_secs_f64())
        };
        let per_core = |c: Option<f64>| c.filter(|_| window_s > 0.0).map(|c| 100.0 * c / window_s);
        let metrics = inp.window.as_ref().and_then(|(a, b)| {
            let (a, b) = (a.metrics.as_ref().ok()?, b.metrics.as_ref().ok()?);
            let forwarded = scrape::delta(a, b, FORWARDED)?;
            let forward_latency = Histogram::from_samples(b, FORWARD_LATENCY)
                .zip(Histogram::from_samples(a, FORWARD_LATENCY))
                .map(|(hb, ha)| {
                    let h = hb.since(&ha);
                    LatencyHistogram {
                        observations: h.total(),
                        mean_s: h.mean(),
                        p50: h.quantile(0.5),
                        p90: h.quantile(0.9),
                        p99: h.quantile(0.99),
                        p999: h.quantile(0.999),
                        lowest_bucket_percent: h
                            .buckets
                            .first()
                            .filter(|_| h.total() > 0.0)
                            .map(|(_, c)| 100.0 * c / h.total()),
                        max_bucket_s: h.quantile(1.0).and_then(|e| e.bucket_upper),
                        buckets: h
                            .buckets
                            .iter()
                            .map(|(le, c)| {
                                let le = if le.is_infinite() {
                                    "+Inf".to_owned()
                                } else {
                                    format!("{le}")
                                };
                                (le, *c)
                            })
                            .collect(),
                    }
                });
            Some(ServerMetrics {
                forwarded,
                forwarded_per_s: if window_s > 0.0 {
                    forwarded / window_s
                } else {
                    0.0
                },
                expected_forwarded,
                datagrams_in: scrape::delta(a, b, DATAGRAMS_IN),
                datagrams_out: scrape::delta(a, b, DATAGRAMS_OUT),
                forward_latency,
                counters: scrape::counter_deltas(a, b, "switchboard_"),
            })
        });
        let server = args.server_pid.map(|pid| {
            let cpu_s = cpu(|s| s.server_cpu);
            let per = |n: Option<f64>| cpu_s.zip(n.filter(|n| *n > 0.0)).map(|(c, n)| c * 1e6 / n);
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
                cpu_per_forwarded_packet_us: match &light {
                    Some(l) => per(Some(l.counted as f64)),
                    None => per(metrics.as_ref().map(|m| m.forwarded)),
                },
                cpu_per_forwarded_packet_basis: if light.is_some() {
                    "distinct in-window packets counted by the light subscribers"
                } else {
                    "the server's switchboard_media_rtp_forwarded_total"
                },
                cpu_per_received_datagram_us: per(metrics.as_ref().and_then(|m| m.datagrams_in)),
                thread_cpu_percent: inp
                    .window
                    .as_ref()
                    .filter(|_| window_s > 0.0)
                    .map(|(a, b)| {
                        b.server_threads
                            .iter()
                            .map(|(name, end)| {
                                let start = a.server_threads.get(name).copied().unwrap_or_default();
                                let used = end.saturating_sub(start).as_secs_f64();
                                (name.clone(), 100.0 * used / window_s)
                            })
                            .filter(|(_, pct)| *pct > 0.0)
                            .collect()
                    })
                    .unwrap_or_default(),
                rss_baseline_bytes: inp.baseline.server_rss,
                rss_after_join_bytes: inp.after_join.server_rss,
                rss_window_start_bytes: inp.window.as_ref().and_then(|(a, _)| a.server_rss),
                rss_steady_bytes: steady,
                rss_after_leave_bytes: inp.finished.server_rss,
                rss_per_participant_bytes: per_participant,
            }
        });
        let own = cpu(|s| s.own_cpu);
        let handled = sent_window_total + received_total + light.as_ref().map_or(0, |l| l.counted);
        let generator = GeneratorStats {
            cpu_window_s: own,
            cpu_percent_of_core: per_core(own),
            cpu_per_packet_us: own
                .filter(|_| handled > 0)
                .map(|c| c * 1e6 / handled as f64),
            rss_bytes: proc::rss_bytes(proc::Pid::Own).ok(),
        };
        let kernel_udp = inp
            .window
            .as_ref()
            .and_then(|(a, b)| {
                let (a, b) = (a.udp.as_ref()?, b.udp.as_ref()?);
                Some(
                    b.iter()
                        .map(|(k, v)| {
                            let before = a.get(k).copied().unwrap_or(0);
                            (k.clone(), *v as i64 - before as i64)
                        })
                        .collect(),
                )
            })
            .unwrap_or_default();
        let _ = (inp.base, inp.joined_at);

        Report {
            tool: "loadtest run",
            url: args.url.clone(),
            run_id: inp.run_id.to_owned(),
            completed: inp.completed,
            config: Config {
                rooms: args.rooms,
                participants_per_room: args.participants,
                duration_s: args.duration.as_secs_f64(),
                warmup_s: args.warmup.as_secs_f64(),
                drain_s: args.drain.as_secs_f64(),
                publishers_per_room,
                video_kbps_target: args.video_kbps,
                audio: args.audio,
                audio_mode_requested: args.audio_mode.proto().as_str(),
                join_timeout_s: args.join_timeout.as_secs_f64(),
                connect_concurrency: args.connect_concurrency,
                timeout_s: args.timeout.as_secs_f64(),
                threads: args.threads.max(1),
                light_subscribers: args.light_subscribers,
            },
            media_source: inp.plan.source(),
            audio_mode_granted,
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
            tracks_removed,
            bad_payloads: bad,
            mixed_audio,
            subscribers,
            flows,
            timeline,
            server,
            server_metrics: metrics,
            generator,
            kernel_udp,
            errors,
            server_errors,
            simulcast: inp.plan.simulcast.as_ref().map(|sc| SimulcastStats {
                rids: crate::publish::SIMULCAST_RIDS,
                lower_sizes: sc.sizes,
                lower_sent: [0, 1].map(|l| outcomes.iter().map(|o| o.lower_sent[l]).sum()),
                lower_received: [0, 1].map(|l| outcomes.iter().map(|o| o.lower_received[l]).sum()),
                publisher_layers_messages: outcomes.iter().map(|o| o.publisher_layers).sum(),
                dynacast: !inp.args.ignore_dynacast,
                layer_changes: outcomes.iter().map(|o| o.layer_changes).sum(),
            }),
            light,
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
            && self.light.as_ref().is_none_or(|l| l.subscribers_short == 0)
            && self
                .mixed_audio
                .as_ref()
                .is_none_or(|m| m.subscribers == m.subscribers_expected)
    }

    /// The title of `--plot`.
    pub fn plot_title(&self) -> String {
        let c = &self.config;
        format!(
            "loadtest run {}: {} rooms x {} participants ({} publishing), video {} kbit/s{}, audio {}",
            self.run_id,
            c.rooms,
            c.participants_per_room,
            c.publishers_per_room,
            c.video_kbps_target,
            if c.audio { " + Opus" } else { "" },
            c.audio_mode_requested
        )
    }

    /// The points of `--plot`.
    pub fn plot_points(&self) -> Vec<Point> {
        self.timeline
            .iter()
            .map(|t| Point {
                t_s: t.t_s,
                latency_p50_ms: t.latency_p50_ms,
                latency_p99_ms: t.latency_p99_ms,
                server_cpu_percent: t.server_cpu_percent,
                generator_cpu_percent: t.generator_cpu_percent,
            })
            .collect()
    }

    /// The human-readable report.
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
        writeln!(t, "Switchboard load test (loadtest run)")?;
        writeln!(t, "  url          {}", self.url)?;
        writeln!(
            t,
            "  run          {}  ({} rooms x {} participants, {} publishing per room, audio mode {}, warm-up {} s, window {} s, drain {} s{})",
            self.run_id,
            c.rooms,
            c.participants_per_room,
            c.publishers_per_room,
            c.audio_mode_requested,
            c.warmup_s,
            c.duration_s,
            c.drain_s,
            if self.completed {
                ""
            } else {
                "; DID NOT COMPLETE"
            },
        )?;
        self.media_source.write_lines(t, c.video_kbps_target)?;
        if let Some(sc) = &self.simulcast {
            writeln!(
                t,
                "  simulcast    rids {}: packets sent on q ({}x{}) {} and on h ({}x{}) {}, at 1/9 and 3/9 of the clip's bytes, next to f; received q {}, h {} (the rest of the report is f); {} publisher-layers messages, {}",
                sc.rids.join("/"),
                sc.lower_sizes[0].0,
                sc.lower_sizes[0].1,
                sc.lower_sent[0],
                sc.lower_sizes[1].0,
                sc.lower_sizes[1].1,
                sc.lower_sent[1],
                sc.lower_received[0],
                sc.lower_received[1],
                sc.publisher_layers_messages,
                if sc.dynacast {
                    format!("obeyed ({} changed the layers sent)", sc.layer_changes)
                } else {
                    "ignored (--ignore-dynacast)".to_owned()
                }
            )?;
        }
        if !self.audio_mode_granted.is_empty() {
            writeln!(
                t,
                "  audio mode   joined with {}",
                join_map(&self.audio_mode_granted)
            )?;
        }
        writeln!(
            t,
            "  machine      {} CPUs ({} online), {}; load avg {:.2} {:.2} {:.2} at start",
            m.nproc, m.cpus_online, m.cpu_model, m.loadavg[0], m.loadavg[1], m.loadavg[2]
        )?;
        writeln!(
            t,
            "  generator    tokio {}, all clients in this process{}",
            if c.threads <= 1 {
                "current-thread runtime".to_owned()
            } else {
                format!("multi-thread runtime, {} workers", c.threads)
            },
            if c.light_subscribers {
                "; light subscribers (recvmmsg, SRTP counted by header, not decrypted)"
            } else {
                ""
            }
        )?;
        writeln!(
            t,
            "  participants {} requested, {} connected, {} failed, {} published, {} dropped{}",
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
        if let Some(l) = &self.light {
            self.write_light(t, l)?;
        } else {
            self.write_media(t)?;
        }
        writeln!(t)?;
        let mut rows: Vec<(String, &Summary)> =
            vec![("join -> connected+negotiated".into(), &self.join_latency)];
        if self.light.is_none() {
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
        }
        stats::write_latency_table(t, 34, &rows)?;
        if self.light.is_some() {
            writeln!(
                t,
                "  end-to-end latency: not available in light mode (SRTP is not decrypted); see the server's forwarding latency below"
            )?;
        }
        self.write_rest(t)
    }

    /// `--light-subscribers`: what was sent, and what the subscribers counted.
    fn write_light(&self, t: &mut String, l: &LightStats) -> std::fmt::Result {
        writeln!(
            t,
            "  LIGHT MODE: subscribers count SRTP headers (distinct SSRC+seq arrived in the window), no decryption"
        )?;
        writeln!(
            t,
            "  media in the window ({:.2} s)   sent   expected at subscribers",
            self.window_s
        )?;
        for k in &self.media {
            writeln!(
                t,
                "    {:<28} {:>7} {:>10}   ({:.0} kbit/s and {:.1} frames/s per publisher, {} keyframes)",
                k.kind,
                k.sent,
                k.expected,
                k.sent_kbps_per_publisher,
                k.frames_per_s_per_publisher,
                k.keyframes
            )?;
        }
        writeln!(
            t,
            "    counted by {} light subscribers: {} distinct packets ({:.0}/s, {:.2} MB) of {} expected, loss {:.3} %; at most {} could be (all sent)",
            l.subscribers,
            l.counted,
            l.counted_per_s,
            l.counted_bytes as f64 / 1e6,
            l.expected,
            l.loss_percent,
            l.sent_bound
        )?;
        writeln!(
            t,
            "    not counted: {} duplicates, {} stale, {} RTX, {} on untracked SSRCs, {} malformed; {} SRTP datagrams in all, mean recvmmsg batch {}",
            l.duplicates,
            l.stale,
            l.rtx,
            l.untracked,
            l.malformed,
            l.rtp_datagrams,
            opt(l.mean_batch, |v| format!("{v:.1}"))
        )?;
        writeln!(
            t,
            "    SSRCs with packets in the window {} of {} expected; {} subscribers short",
            l.ssrcs_seen, l.ssrcs_expected, l.subscribers_short
        )
    }

    /// The media table of a full run.
    fn write_media(&self, t: &mut String) -> std::fmt::Result {
        let c = &self.config;
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
        for k in &self.media {
            writeln!(
                t,
                "    {:<6} sent {:.0} kbit/s and {:.1} frames/s per publisher ({} keyframes); received {:.2} MB; jitter mean {} max {}; RTP-seq loss {}/{}",
                k.kind,
                k.sent_kbps_per_publisher,
                k.frames_per_s_per_publisher,
                k.keyframes,
                k.received_bytes as f64 / 1e6,
                opt(k.jitter_ms_mean, |v| format!("{v:.2} ms")),
                opt(k.jitter_ms_max, |v| format!("{v:.2} ms")),
                k.rtp_lost,
                k.rtp_expected
            )?;
        }
        if let Some(m) = &self.mixed_audio {
            writeln!(
                t,
                "    mixed audio: {} of {} subscribers got a mix track; {} packets, RTP-seq loss {}/{} ({:.3} %), jitter mean {} max {}, join -> first packet p50 {}",
                m.subscribers,
                m.subscribers_expected,
                m.received,
                m.rtp_lost,
                m.rtp_expected,
                m.loss_percent,
                opt(m.jitter_ms_mean, |v| format!("{v:.2} ms")),
                opt(m.jitter_ms_max, |v| format!("{v:.2} ms")),
                stats::ms(m.first_packet_after_join.p50)
            )?;
            writeln!(t, "      ({})", m.note)?;
        } else if c.audio && c.audio_mode_requested == "mix" {
            writeln!(
                t,
                "    mixed audio: no `mix` track arrived; the server forwarded each publisher's audio (counted above, with latency)"
            )?;
        }
        writeln!(
            t,
            "    tracks announced {} of {} expected, {} removed{}",
            self.tracks_added,
            self.tracks_expected,
            self.tracks_removed,
            if self.bad_payloads.is_empty() {
                String::new()
            } else {
                format!("; uncounted payloads: {}", join_map(&self.bad_payloads))
            }
        )
    }

    /// Per subscriber, the server, the generator, errors.
    fn write_rest(&self, t: &mut String) -> std::fmt::Result {
        let p = &self.participants;
        writeln!(t)?;
        writeln!(
            t,
            "  per subscriber      received/expected   loss %      MB  jitter   e2e p50    p99    max (ms)  first pkt (ms, slowest track)"
        )?;
        for s in &self.subscribers {
            writeln!(
                t,
                "    {:<16} {:>9}/{:<9} {:>7.3} {:>7.2} {:>7}  {:>7} {:>7} {:>7}   {}{}{}",
                s.name,
                s.received,
                s.expected,
                s.loss_percent,
                s.received_bytes as f64 / 1e6,
                opt(s.jitter_ms_max, |v| format!("{v:.2}")),
                stats::ms(s.latency.p50),
                stats::ms(s.latency.p99),
                stats::ms(s.latency.max),
                s.first_packet_max_ms
                    .map_or("-".into(), |v| format!("{v:.0}")),
                s.mix_received.map_or(String::new(), |n| format!(
                    "  mix {n} pkts, {} lost",
                    s.mix_lost.unwrap_or(0)
                )),
                s.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("  ({e})"))
            )?;
        }
        writeln!(t)?;
        match &self.server {
            Some(s) => {
                writeln!(
                    t,
                    "  server (pid {}, {})",
                    s.pid,
                    s.name.as_deref().unwrap_or("exited")
                )?;
                writeln!(
                    t,
                    "    CPU in window        {}  ({} of one core; the generator beside it: {} of one core)",
                    opt(s.cpu_window_s, |v| format!("{v:.2} s")),
                    opt(s.cpu_percent_of_core, |v| format!("{v:.1} %")),
                    opt(self.generator.cpu_percent_of_core, |v| format!("{v:.1} %"))
                )?;
                writeln!(
                    t,
                    "    CPU per packet       {} per forwarded RTP packet, {} per received datagram{}",
                    opt(s.cpu_per_forwarded_packet_us, |v| format!("{v:.2} µs")),
                    opt(s.cpu_per_received_datagram_us, |v| format!("{v:.2} µs")),
                    if self.light.is_some() {
                        " (forwarded = distinct packets the light subscribers counted)"
                    } else {
                        ""
                    }
                )?;
                if !s.thread_cpu_percent.is_empty() {
                    let threads: Vec<String> = s
                        .thread_cpu_percent
                        .iter()
                        .map(|(name, pct)| format!("{name} {pct:.1} %"))
                        .collect();
                    writeln!(t, "    CPU by thread        {}", threads.join(", "))?;
                }
                writeln!(
                    t,
                    "    RSS                  baseline {}, all connected {}, window start {}, steady (window end) {}, after leaving {}",
                    mib(s.rss_baseline_bytes),
                    mib(s.rss_after_join_bytes),
                    mib(s.rss_window_start_bytes),
                    mib(s.rss_steady_bytes),
                    mib(s.rss_after_leave_bytes)
                )?;
                writeln!(
                    t,
                    "    RSS/participant      {}  ((steady - baseline) / {} connected)",
                    opt(s.rss_per_participant_bytes, |b| format!(
                        "{:.1} KiB",
                        b as f64 / 1024.0
                    )),
                    p.connected
                )?;
            }
            None => writeln!(
                t,
                "  server               (no --server-pid: CPU and RSS not sampled)"
            )?,
        }
        match &self.server_metrics {
            Some(sm) => {
                writeln!(
                    t,
                    "    forwarded            {:.0} RTP packets ({:.0}/s); the generator expected {}",
                    sm.forwarded, sm.forwarded_per_s, sm.expected_forwarded
                )?;
                writeln!(
                    t,
                    "    media datagrams      {} in, {} out",
                    opt(sm.datagrams_in, |v| format!("{v:.0}")),
                    opt(sm.datagrams_out, |v| format!("{v:.0}"))
                )?;
                if let Some(h) = &sm.forward_latency {
                    writeln!(
                        t,
                        "    forwarding latency   p50 {}, p99 {}, p99.9 {}, max {}, mean {}",
                        est(h.p50),
                        est(h.p99),
                        est(h.p999),
                        h.max_bucket_s
                            .map_or("> last bucket".into(), |v| format!("<= {:.3} ms", v * 1e3)),
                        opt(h.mean_s, |v| format!("{:.3} ms", v * 1e3)),
                    )?;
                    writeln!(
                        t,
                        "                         ({:.0} packets, {} in the lowest bucket; the server's histogram,\n                         \
                         arrival -> last copy queued in rtc; the outbound interceptors, SRTP and sendto come later)",
                        h.observations,
                        opt(h.lowest_bucket_percent, |v| format!("{v:.2} %")),
                    )?;
                }
                let others: Vec<String> = sm
                    .counters
                    .iter()
                    .filter(|(k, _)| {
                        ![FORWARDED, DATAGRAMS_IN, DATAGRAMS_OUT].contains(&k.as_str())
                            && !k.contains("_bytes_total")
                            && !k.starts_with("switchboard_signaling_")
                    })
                    .map(|(k, v)| format!("{}={v:.0}", k.trim_start_matches("switchboard_")))
                    .collect();
                if !others.is_empty() {
                    writeln!(t, "    other counters       {}", others.join(", "))?;
                }
            }
            None => writeln!(t, "    /metrics             not available over the window")?,
        }
        let g = &self.generator;
        writeln!(
            t,
            "  generator CPU          {} in window ({} of one core, {} per packet sent or received), RSS {}",
            opt(g.cpu_window_s, |v| format!("{v:.2} s")),
            opt(g.cpu_percent_of_core, |v| format!("{v:.1} %")),
            opt(g.cpu_per_packet_us, |v| format!("{v:.2} µs")),
            mib(g.rss_bytes)
        )?;
        if !self.kernel_udp.is_empty() {
            let pick: Vec<String> = [
                "InDatagrams",
                "OutDatagrams",
                "RcvbufErrors",
                "SndbufErrors",
                "InErrors",
            ]
            .iter()
            .filter_map(|k| Some(format!("{k}={}", self.kernel_udp.get(*k)?)))
            .collect();
            writeln!(
                t,
                "  kernel UDP (window)    {}  (system-wide)",
                pick.join(", ")
            )?;
        }
        if !self.server_errors.is_empty() {
            writeln!(
                t,
                "  server errors          {}",
                join_map(&self.server_errors)
            )?;
        }
        if self.errors.is_empty() {
            writeln!(t, "  participant errors     none")?;
        } else {
            writeln!(t, "  participant errors")?;
            for (e, n) in &self.errors {
                writeln!(t, "    {n:>6}  {e}")?;
            }
        }
        writeln!(t)
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "n/a".to_owned(), f)
}

/// A histogram quantile: `<= upper` when it falls in the lowest bucket
/// (interpolating there would only say "half the bucket"), else the
/// interpolated value with its bucket.
fn est(e: Option<Estimate>) -> String {
    let ms = |s: f64| s * 1e3;
    let Some(e) = e else {
        return "n/a".into();
    };
    match e.bucket_upper {
        None => format!("> {:.3} ms", ms(e.bucket_lower)),
        Some(hi) if e.bucket_lower <= 0.0 => format!("<= {:.3} ms", ms(hi)),
        Some(hi) => format!(
            "{:.3} ms (in {:.3}-{:.3})",
            ms(e.seconds),
            ms(e.bucket_lower),
            ms(hi)
        ),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map_or("n/a".into(), |b| format!("{:.2} MiB", b as f64 / 1048576.0))
}

fn join_map(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
