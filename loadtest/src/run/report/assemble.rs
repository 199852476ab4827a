//! Building the [`Report`] from what the run collected.

use super::*;
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
    pub(in crate::run) fn assemble(inp: Inputs<'_>) -> Report {
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
        let mix_requested = args.audio_mode == super::super::AudioModeArg::Mix;
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
                    id_to_index.contains_key(id.as_str()) || id == super::super::MIX_STREAM_ID
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
}
