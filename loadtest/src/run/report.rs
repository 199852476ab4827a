//! `loadtest run`'s report: the figures, the table and the JSON.

use std::collections::{BTreeMap, HashMap};
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

mod assemble;
mod table;

impl Report {
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
}
