//! The report as text.

use std::fmt::Write as _;

use super::*;

impl Report {
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
