//! The report of `loadtest shaped`: every figure (also as JSON) and the
//! table a person reads.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::net::Tbf;
use super::record::{Loss, PublisherFigures, LAYERS};
use super::viewer::ViewerReport;
use super::{Media, ShapedArgs};
use crate::proc::Machine;
use crate::publish::MediaPlan;

/// What one publisher sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublisherSent {
    pub publisher: usize,
    /// RTP packets handed to the client per layer (q, h, f).
    pub video_packets: [u64; 3],
    pub audio_packets: u64,
    pub keyframes_requested: u64,
    /// `publisher-layers` (dynacast) received: (ms since publishing
    /// started, the rids to send); at most the first 100.
    pub layer_log: Vec<(u64, Vec<String>)>,
    /// Connection states reported after `connected`.
    pub later_states: Vec<String>,
    pub error: Option<String>,
}

/// The server's CPU (utime + stime) per phase, in % of one core.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerCpu {
    pub before_percent: Option<f64>,
    pub capped_percent: Option<f64>,
    pub after_percent: Option<f64>,
    /// CPU seconds over the three phases.
    pub total_s: Option<f64>,
}

impl ServerCpu {
    /// From samples at the start, the cap, the uncap and the end.
    pub fn of(samples: &[(Instant, Option<Duration>)]) -> ServerCpu {
        let pct = |i: usize| {
            let (t0, c0) = samples.get(i)?;
            let (t1, c1) = samples.get(i + 1)?;
            let wall = t1.saturating_duration_since(*t0).as_secs_f64();
            let cpu = c1.as_ref()?.saturating_sub((*c0)?).as_secs_f64();
            (wall > 0.0).then(|| (1000.0 * cpu / wall).round() / 10.0)
        };
        let total = match (samples.first(), samples.last()) {
            (Some((_, Some(a))), Some((_, Some(b)))) => Some(b.saturating_sub(*a).as_secs_f64()),
            _ => None,
        };
        ServerCpu {
            before_percent: pct(0),
            capped_percent: pct(1),
            after_percent: pct(2),
            total_s: total,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub subcommand: &'static str,
    pub machine: Machine,
    pub server_bin: String,
    pub publishers: usize,
    /// Per layer (q, h, f), kbit/s of frame data each publisher sends.
    pub layer_kbps: [f64; 3],
    pub audio: &'static str,
    /// The qdisc of the capped phase.
    pub cap: String,
    pub before_s: f64,
    pub capped_s: f64,
    pub after_s: f64,
    pub shaped: Option<ViewerReport>,
    pub unshaped: Option<ViewerReport>,
    pub sent: Vec<PublisherSent>,
    /// The qdisc's counters when it was removed.
    pub tbf: Tbf,
    pub server_cpu: ServerCpu,
    /// ms from the cap and from the uncap to the shaped viewer's
    /// acknowledgement: an upper bound on how late its clock takes them.
    pub shaped_ack_ms: [Option<f64>; 2],
    /// How the figures are measured.
    pub measured: &'static str,
    /// What went wrong (empty: the run completed and both viewers received
    /// video from every publisher before the cap).
    pub problems: Vec<String>,
}

const MEASURED: &str = "per viewer and publisher, on the viewer's clock, from the moment it \
    was told of the boundary. A frame is complete when every packet of it arrived (first = \
    start of VP8 partition 0, last = RTP marker bit, the stamp's per-layer sequence numbers in \
    between all present; retransmissions count); one that completes after a newer frame is \
    late and not counted. Layer at the cap/uncap = the layer of the \
    last complete frame before it. Cap to lower layer = to the first complete frame of a layer \
    below that one. Freeze = longest time without a new complete frame within the phase, its \
    edges included (before: from the first frame). Loss = RTP sequence gaps of the forwarded \
    stream among the packets that arrived in the phase, after retransmission. Uncap to top = \
    to the first complete frame of layer f after the uncap.";

impl Report {
    pub fn assemble(
        args: &ShapedArgs,
        machine: Machine,
        plan: &MediaPlan,
        bin: &Path,
        veth: &str,
        media: Media,
    ) -> Report {
        let top = plan
            .video
            .as_ref()
            .map_or(0.0, |_| f64::from(args.video_kbps));
        let mut problems = media.problems;
        for (name, v) in [("shaped", &media.shaped), ("unshaped", &media.unshaped)] {
            let Some(v) = v else { continue };
            for f in &v.publishers {
                if f.frames_before.iter().sum::<u64>() == 0 {
                    problems.push(format!(
                        "the {name} viewer received no complete video frame from publisher {} \
                         before the cap",
                        f.publisher
                    ));
                }
            }
        }
        Report {
            subcommand: "shaped",
            machine,
            server_bin: bin.display().to_string(),
            publishers: args.publishers,
            layer_kbps: [top / 9.0, top * 3.0 / 9.0, top],
            audio: "Opus 48 kHz mono, 20 ms frames (the 440 Hz tone of loadtest run)",
            cap: format!(
                "tc qdisc add dev {veth} root tbf rate {}kbit burst 20kb latency 200ms",
                args.cap_kbit
            ),
            before_s: args.before.as_secs_f64(),
            capped_s: args.capped.as_secs_f64(),
            after_s: args.after.as_secs_f64(),
            shaped: media.shaped,
            unshaped: media.unshaped,
            sent: media.sent,
            tbf: media.tbf,
            server_cpu: media.cpu,
            shaped_ack_ms: media.child_lag_ms,
            measured: MEASURED,
            problems,
        }
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        self.write_table(&mut t)
            .expect("formatting into a String cannot fail");
        t
    }

    fn write_table(&self, t: &mut String) -> std::fmt::Result {
        let m = &self.machine;
        writeln!(t)?;
        writeln!(t, "Switchboard shaped viewer (loadtest shaped)")?;
        writeln!(
            t,
            "  publishers   {} x simulcast VP8 q/h/f at {:.0}/{:.0}/{:.0} kbit/s + Opus",
            self.publishers, self.layer_kbps[0], self.layer_kbps[1], self.layer_kbps[2]
        )?;
        writeln!(
            t,
            "  phases       before {} s, capped {} s, after {} s",
            self.before_s, self.capped_s, self.after_s
        )?;
        writeln!(t, "  cap          {}", self.cap)?;
        writeln!(
            t,
            "  machine      {} CPUs ({}), load average {:.2} {:.2} {:.2}",
            m.nproc, m.cpu_model, m.loadavg[0], m.loadavg[1], m.loadavg[2]
        )?;
        writeln!(t)?;
        let viewers: Vec<(&str, &ViewerReport)> =
            [("shaped", &self.shaped), ("unshaped", &self.unshaped)]
                .into_iter()
                .filter_map(|(n, v)| v.as_ref().map(|v| (n, v)))
                .collect();
        let cols: Vec<(String, &PublisherFigures)> = viewers
            .iter()
            .flat_map(|(n, v)| {
                v.publishers
                    .iter()
                    .map(move |f| (format!("{n} p{}", f.publisher), f))
            })
            .collect();
        write!(t, "  {:<36}", "")?;
        for (name, _) in &cols {
            write!(t, "{name:>15}")?;
        }
        writeln!(t)?;
        let mut row =
            |label: &str, cell: &dyn Fn(&PublisherFigures) -> String| -> std::fmt::Result {
                write!(t, "  {label:<36}")?;
                for (_, f) in &cols {
                    write!(t, "{:>15}", cell(f))?;
                }
                writeln!(t)
            };
        let layer = |l: Option<usize>| {
            l.and_then(|l| LAYERS.get(l))
                .map_or("-".to_owned(), |s| (*s).to_owned())
        };
        let secs = |v: Option<f64>| v.map_or("-".to_owned(), |ms| format!("{:.2} s", ms / 1e3));
        let millis = |v: Option<f64>| v.map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
        let frames = |n: &[u64; 3]| format!("{}/{}/{}", n[0], n[1], n[2]);
        let loss = |l: &Loss| format!("{:.1}% ({})", l.percent, l.lost);
        row("frames q/h/f before the cap", &|f| frames(&f.frames_before))?;
        row("layer at the cap", &|f| layer(f.layer_at_cap))?;
        row("longest freeze before the cap", &|f| {
            secs(f.freeze_before_ms)
        })?;
        row("cap -> first lower-layer frame", &|f| {
            secs(f.cap_to_lower_ms)
        })?;
        row("frames q/h/f under the cap", &|f| frames(&f.frames_capped))?;
        row("late frames under the cap (dropped)", &|f| {
            f.late_frames[1].to_string()
        })?;
        row("longest freeze under the cap", &|f| {
            secs(f.freeze_capped_ms)
        })?;
        row("video loss under the cap (lost)", &|f| {
            loss(&f.video_loss_capped)
        })?;
        row("audio loss under the cap (lost)", &|f| {
            loss(&f.audio_loss_capped)
        })?;
        row("audio packets under the cap", &|f| {
            f.audio_loss_capped.received.to_string()
        })?;
        row("longest audio gap under the cap", &|f| {
            secs(f.audio_gap_capped_ms)
        })?;
        row("layer at the uncap", &|f| layer(f.layer_at_uncap))?;
        row("uncap -> first top-layer frame", &|f| {
            f.uncap_to_top_ms.map_or("not in --after".to_owned(), |ms| {
                format!("{:.2} s", ms / 1e3)
            })
        })?;
        row("frames q/h/f after the uncap", &|f| frames(&f.frames_after))?;
        row("longest freeze after the uncap", &|f| {
            secs(f.freeze_after_ms)
        })?;
        row("layer at the end", &|f| layer(f.layer_at_end))?;
        writeln!(t)?;
        let opt = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        writeln!(
            t,
            "  tbf          sent {} packets ({} bytes), dropped {}, overlimits {}",
            opt(self.tbf.sent_packets),
            opt(self.tbf.sent_bytes),
            opt(self.tbf.dropped),
            opt(self.tbf.overlimits)
        )?;
        let pct = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.1} %"));
        writeln!(
            t,
            "  server CPU   before {}, capped {}, after {} of a core ({} s in all)",
            pct(self.server_cpu.before_percent),
            pct(self.server_cpu.capped_percent),
            pct(self.server_cpu.after_percent),
            self.server_cpu
                .total_s
                .map_or("?".to_owned(), |s| format!("{s:.1}"))
        )?;
        for s in &self.sent {
            writeln!(
                t,
                "  publisher {}  sent q/h/f {}/{}/{} video packets, {} audio; {} keyframe requests, {} publisher-layers",
                s.publisher,
                s.video_packets[0],
                s.video_packets[1],
                s.video_packets[2],
                s.audio_packets,
                s.keyframes_requested,
                s.layer_log.len()
            )?;
        }
        writeln!(
            t,
            "  shaped ack   {} after the cap, {} after the uncap",
            millis(self.shaped_ack_ms[0]),
            millis(self.shaped_ack_ms[1])
        )?;
        for (n, v) in &viewers {
            if !v.bad.is_empty() || !v.later_states.is_empty() || !v.server_errors.is_empty() {
                writeln!(
                    t,
                    "  {n:<12} not counted {:?}; states {:?}; server errors {:?}",
                    v.bad, v.later_states, v.server_errors
                )?;
            }
        }
        if self.problems.is_empty() {
            writeln!(t, "  result       completed")?;
        } else {
            for p in &self.problems {
                writeln!(t, "  PROBLEM      {p}")?;
            }
        }
        writeln!(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_phase() {
        let t0 = Instant::now();
        let s = |secs: u64, cpu_ms: Option<u64>| {
            (
                t0 + Duration::from_secs(secs),
                cpu_ms.map(Duration::from_millis),
            )
        };
        let c = ServerCpu::of(&[
            s(0, Some(0)),
            s(10, Some(2500)),
            s(20, None),
            s(30, Some(9000)),
        ]);
        assert_eq!(c.before_percent, Some(25.0));
        assert_eq!(c.capped_percent, None);
        assert_eq!(c.after_percent, None);
        assert_eq!(c.total_s, Some(9.0));
    }
}
