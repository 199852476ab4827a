//! Audio mixer benchmark (issue 4, "Figures to report"): CPU per 20 ms tick
//! for rooms of 10, 50 and 100 participants with 3 talking, for our
//! [`RoomMixer`] and for a naive mixer written here the way Janus
//! AudioBridge mixes (decode every input, then for every listener sum the
//! N−1 others and encode once per listener with its own encoder), side by
//! side in one run; and memory per mixed participant.
//!
//! ```sh
//! cargo bench --bench mixer
//! ```
//!
//! - Inputs: real Opus packets, encoded with libopus before anything is
//!   timed (one second per participant, replayed with fresh sequence numbers
//!   and timestamps). The 3 talkers send harmonic tones with a 3 Hz
//!   syllable-like envelope; everyone else sends what a browser sends when
//!   quiet: a packet of low noise (about −63 dBov) every 20 ms, no DTX. The
//!   sources are encoded like a browser's (VoIP, mono, 32 kbit/s).
//! - One benchmark iteration is one tick: every participant's packet in,
//!   one mixing tick, every listener's packet looked up. Both mixers get the
//!   same packets; ours also runs its jitter buffers and level meters (no
//!   RFC 6464 levels are given, so it measures levels from the PCM), the
//!   naive one decodes straight from the packet.
//! - The time criterion is given is this thread's CPU time
//!   (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the machine is shared, and
//!   "share of one core" is a CPU figure. Wall time is printed beside it.
//! - Memory: a counting global allocator (stats_alloc around
//!   `std::alloc::System`) gives the Rust heap per input; libopus allocates
//!   its encoder and decoder with C `malloc`, which that cannot see, so the
//!   process RSS delta around adding 1000 inputs (and around their first
//!   ticks) is measured too.
//!
//! The summary table at the end is what `docs/benchmarks.md` reports.

use std::alloc::System;
use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;
use criterion::{BenchmarkId, Criterion, SamplingMode};
use opus::{Application, Bitrate, Channels, Decoder, Encoder};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use switchboard::mixer::{InputId, MixerConfig, Pcm, RoomMixer, FRAME_SAMPLES, SAMPLE_RATE};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Room sizes measured.
const SIZES: [usize; 3] = [10, 50, 100];
/// Participants talking in every room.
const TALKERS: usize = 3;
/// Pre-encoded packets per participant (one second), replayed in a loop.
const CYCLE: usize = 50;
const TICK: Duration = Duration::from_millis(20);
/// Largest Opus packet either mixer writes.
const MAX_PACKET: usize = 1500;
/// Bitrate of the simulated browsers' Opus encoders.
const SOURCE_BITRATE: i32 = 32_000;
/// Inputs created for the RSS measurement.
const MEMORY_INPUTS: usize = 1000;

const SAMPLE_SIZE: usize = 20;
const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_secs(2);

/// A tiny deterministic PRNG (xorshift64*) for the noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-amp, amp].
    fn sample(&mut self, amp: i32) -> i16 {
        let span = (2 * amp + 1) as u64;
        ((self.next() % span) as i32 - amp) as i16
    }
}

/// One participant's second of audio, Opus-encoded into 20 ms packets.
fn encode_source(talker: Option<usize>, seed: u64) -> Vec<Vec<u8>> {
    let mut enc = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).expect("encoder");
    enc.set_bitrate(Bitrate::Bits(SOURCE_BITRATE))
        .expect("bitrate");
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut pcm = vec![0i16; FRAME_SAMPLES];
    let mut buf = vec![0u8; MAX_PACKET];
    let mut packets = Vec::with_capacity(CYCLE);
    for frame in 0..CYCLE {
        for (i, s) in pcm.iter_mut().enumerate() {
            let n = (frame * FRAME_SAMPLES + i) as f32;
            let t = n / SAMPLE_RATE as f32;
            let noise = rng.sample(40);
            *s = match talker {
                Some(k) => {
                    // A voice-like harmonic tone (fundamental 120..240 Hz)
                    // with a 3 Hz envelope between 0.4 and 1.0.
                    let f0 = 120.0 + 60.0 * k as f32;
                    let env = 0.7 + 0.3 * (2.0 * std::f32::consts::PI * 3.0 * t).sin();
                    let mut v = 0.0;
                    for h in 1..=4 {
                        v += (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() / h as f32;
                    }
                    (4000.0 * env * v) as i16 + noise
                }
                None => noise,
            };
        }
        let len = enc.encode(&pcm, &mut buf).expect("encode");
        packets.push(buf[..len].to_vec());
    }
    packets
}

/// Every participant's packets: talkers first.
struct Feed {
    packets: Vec<Vec<Vec<u8>>>,
}

impl Feed {
    fn new(n: usize) -> Self {
        let packets = (0..n)
            .map(|i| encode_source((i < TALKERS).then_some(i), i as u64 + 1))
            .collect();
        Feed { packets }
    }

    fn packet(&self, input: usize, tick: u64) -> &[u8] {
        &self.packets[input][tick as usize % CYCLE]
    }

    fn mean_len(&self, talkers: bool) -> f64 {
        let range = if talkers {
            0..TALKERS
        } else {
            TALKERS..self.packets.len()
        };
        let (mut sum, mut count) = (0usize, 0usize);
        for p in &self.packets[range] {
            sum += p.iter().map(Vec::len).sum::<usize>();
            count += p.len();
        }
        sum as f64 / count.max(1) as f64
    }
}

/// What a tick is driven by.
trait Mixer {
    fn step(&mut self, feed: &Feed);
}

/// Our `RoomMixer` as the media plane drives it.
struct Ours {
    mixer: RoomMixer,
    n: usize,
    tick: u64,
    start: Instant,
}

impl Ours {
    fn new(n: usize) -> Self {
        let mut mixer = RoomMixer::new(MixerConfig::default()).expect("mixer");
        for i in 0..n {
            mixer.add_input(InputId(i as u32)).expect("add_input");
        }
        Ours {
            mixer,
            n,
            tick: 0,
            start: Instant::now(),
        }
    }

    /// Runs one tick and returns (encodes, speakers) of it.
    fn step_counted(&mut self, feed: &Feed) -> (usize, usize) {
        let t = self.tick;
        self.tick += 1;
        let now = self.start + TICK * t as u32;
        let seq = t as u16;
        let ts = (t * FRAME_SAMPLES as u64) as u32;
        for i in 0..self.n {
            let _ = self
                .mixer
                .push(InputId(i as u32), seq, ts, feed.packet(i, t), None, now);
        }
        let out = self.mixer.tick(now);
        let mut bytes = 0;
        for i in 0..self.n {
            bytes += out.packet_for(InputId(i as u32)).map_or(0, <[u8]>::len);
        }
        black_box(bytes);
        (out.encodes(), out.speakers().len())
    }
}

impl Mixer for Ours {
    fn step(&mut self, feed: &Feed) {
        self.step_counted(feed);
    }
}

/// The naive mixer, as Janus AudioBridge does it: decode every input, sum
/// them all, and for every listener take out its own audio, clip to 16 bits
/// and encode with that listener's own encoder. No buffers are allocated in
/// a tick.
struct Naive {
    decoders: Vec<Decoder>,
    encoders: Vec<Encoder>,
    pcm: Vec<Pcm>,
    has_audio: Vec<bool>,
    acc: Box<[i32; FRAME_SAMPLES]>,
    mixed: Box<Pcm>,
    out: Vec<Vec<u8>>,
    lens: Vec<usize>,
    tick: u64,
}

impl Naive {
    fn new(n: usize) -> Self {
        Naive {
            decoders: (0..n)
                .map(|_| Decoder::new(SAMPLE_RATE, Channels::Mono).expect("decoder"))
                .collect(),
            // The same encoder settings as `RoomMixer`'s (MixerConfig's
            // defaults: VoIP, mono, libopus's bitrate, no FEC).
            encoders: (0..n)
                .map(|_| {
                    Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).expect("encoder")
                })
                .collect(),
            pcm: vec![[0i16; FRAME_SAMPLES]; n],
            has_audio: vec![false; n],
            acc: Box::new([0; FRAME_SAMPLES]),
            mixed: Box::new([0; FRAME_SAMPLES]),
            out: (0..n).map(|_| vec![0u8; MAX_PACKET]).collect(),
            lens: vec![0; n],
            tick: 0,
        }
    }
}

impl Mixer for Naive {
    fn step(&mut self, feed: &Feed) {
        let t = self.tick;
        self.tick += 1;
        self.acc.fill(0);
        for (i, dec) in self.decoders.iter_mut().enumerate() {
            let pcm = &mut self.pcm[i];
            self.has_audio[i] = match dec.decode(feed.packet(i, t), &mut pcm[..], false) {
                Ok(n) => {
                    pcm[n.min(FRAME_SAMPLES)..].fill(0);
                    true
                }
                Err(_) => false,
            };
            if self.has_audio[i] {
                for (a, s) in self.acc.iter_mut().zip(pcm.iter()) {
                    *a += i32::from(*s);
                }
            }
        }
        for (l, enc) in self.encoders.iter_mut().enumerate() {
            let own = &self.pcm[l];
            let has = self.has_audio[l];
            for (i, (m, a)) in self.mixed.iter_mut().zip(self.acc.iter()).enumerate() {
                let v = if has { *a - i32::from(own[i]) } else { *a };
                *m = v.clamp(-32768, 32767) as i16;
            }
            self.lens[l] = enc.encode(&self.mixed[..], &mut self.out[l]).unwrap_or(0);
        }
        black_box(self.lens.iter().sum::<usize>());
    }
}

/// One benchmark's samples: (iterations, thread CPU, wall) per call of the
/// routine. Criterion calls it for warm-up first, then once per sample; the
/// last `SAMPLE_SIZE` calls are the measurement.
type Samples = Rc<RefCell<Vec<(u64, Duration, Duration)>>>;

fn bench_one<M: Mixer>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    n: usize,
    mixer: &mut M,
    feed: &Feed,
) -> Samples {
    let samples: Samples = Rc::default();
    let record = samples.clone();
    group.bench_function(BenchmarkId::new(name, n), |b| {
        b.iter_custom(|iters| {
            let wall = Instant::now();
            let cpu = ThreadTime::now();
            for _ in 0..iters {
                mixer.step(feed);
            }
            let cpu = cpu.elapsed();
            record.borrow_mut().push((iters, cpu, wall.elapsed()));
            cpu
        });
    });
    samples
}

/// Per-tick (CPU, wall) of the measured samples: medians of the samples'
/// per-iteration means.
fn per_tick(samples: &Samples) -> (Duration, Duration) {
    let all = samples.borrow();
    let measured = &all[all.len().saturating_sub(SAMPLE_SIZE)..];
    let median = |f: &dyn Fn(&(u64, Duration, Duration)) -> Duration| {
        let mut v: Vec<Duration> = measured
            .iter()
            .map(|s| f(s) / u32::try_from(s.0.max(1)).unwrap_or(u32::MAX))
            .collect();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    (median(&|s| s.1), median(&|s| s.2))
}

struct Row {
    n: usize,
    ours_cpu: Duration,
    ours_wall: Duration,
    naive_cpu: Duration,
    naive_wall: Duration,
    ours_encodes: usize,
    ours_speakers: usize,
    ours_allocs_per_tick: f64,
    talker_bytes: f64,
    quiet_bytes: f64,
}

struct Memory {
    inputs: usize,
    heap_per_input: f64,
    rss_add_per_input: f64,
    rss_ticked_per_input: f64,
    rss_naive_per_participant: f64,
}

/// This process's resident set size in bytes (`VmRSS`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Memory per mixed participant, measured before anything else runs.
fn measure_memory(inputs: usize) -> Memory {
    let feed = Feed::new(TALKERS + 1);
    let quiet = |i: usize| i.min(TALKERS);

    // The Rust heap, counted exactly by the global allocator.
    let mut mixer = RoomMixer::new(MixerConfig::default()).expect("mixer");
    let region = Region::new(GLOBAL);
    let rss0 = rss_bytes();
    for i in 0..inputs {
        mixer.add_input(InputId(i as u32)).expect("add_input");
    }
    let rss1 = rss_bytes();
    let heap = region.change();
    let heap_net = heap.bytes_allocated as f64 - heap.bytes_deallocated as f64;

    // The same inputs after a second of traffic (every jitter buffer,
    // decoder and PCM buffer in use).
    let start = Instant::now();
    for t in 0..CYCLE as u64 {
        let now = start + TICK * t as u32;
        for i in 0..inputs {
            let _ = mixer.push(
                InputId(i as u32),
                t as u16,
                (t * FRAME_SAMPLES as u64) as u32,
                feed.packet(quiet(i), t),
                None,
                now,
            );
        }
        black_box(mixer.tick(now).encodes());
    }
    let rss2 = rss_bytes();

    // The naive mixer's per-participant state (decoder, encoder, buffers),
    // while ours still holds its memory (so none of it is reused).
    let rss3 = rss_bytes();
    let mut naive = Naive::new(inputs);
    let rss4 = rss_bytes();
    black_box(&mut naive);
    drop(naive);
    drop(mixer);

    let per = |bytes: f64| bytes / inputs as f64;
    Memory {
        inputs,
        heap_per_input: per(heap_net),
        rss_add_per_input: per(rss1.saturating_sub(rss0) as f64),
        rss_ticked_per_input: per(rss2.saturating_sub(rss0) as f64),
        rss_naive_per_participant: per(rss4.saturating_sub(rss3) as f64),
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and
    // then everything runs once, quickly, as a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &SIZES } else { &SIZES[..1] };
    let load_start = load_average();

    let memory = measure_memory(if full { MEMORY_INPUTS } else { 20 });

    let mut c = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .nresamples(10_000)
        .without_plots()
        .configure_from_args();

    let mut rows = Vec::new();
    for &n in sizes {
        // Everything below is set up before timing: packets encoded, both
        // mixers built and warmed up until ours mixes the 3 talkers.
        let feed = Feed::new(n);
        let mut ours = Ours::new(n);
        let mut naive = Naive::new(n);
        for _ in 0..CYCLE {
            ours.step(&feed);
            naive.step(&feed);
        }
        let (ours_encodes, ours_speakers) = ours.step_counted(&feed);
        assert_eq!(ours_speakers, TALKERS, "the 3 talkers are the speakers");
        assert_eq!(ours_encodes, TALKERS + 1, "K own mixes + 1 shared");
        let region = Region::new(GLOBAL);
        let ticks = 10;
        for _ in 0..ticks {
            ours.step(&feed);
        }
        let ours_allocs_per_tick = region.change().allocations as f64 / f64::from(ticks);

        let mut group =
            c.benchmark_group(format!("mixer tick, {n} participants, {TALKERS} talking"));
        group.sampling_mode(SamplingMode::Flat);
        let ours_samples = bench_one(&mut group, "ours", n, &mut ours, &feed);
        let naive_samples = bench_one(&mut group, "naive", n, &mut naive, &feed);
        group.finish();

        if ours_samples.borrow().is_empty() || naive_samples.borrow().is_empty() {
            continue; // filtered out on the command line
        }
        let (ours_cpu, ours_wall) = per_tick(&ours_samples);
        let (naive_cpu, naive_wall) = per_tick(&naive_samples);
        rows.push(Row {
            n,
            ours_cpu,
            ours_wall,
            naive_cpu,
            naive_wall,
            ours_encodes,
            ours_speakers,
            ours_allocs_per_tick,
            talker_bytes: feed.mean_len(true),
            quiet_bytes: feed.mean_len(false),
        });
    }
    c.final_summary();

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let core = |d: Duration| 100.0 * d.as_secs_f64() / TICK.as_secs_f64();
    println!();
    if !full {
        println!("(smoke test without --bench: one tick per benchmark, not figures)");
    }
    println!("== Audio mixer: one 20 ms tick, {TALKERS} talking (thread CPU time, median of {SAMPLE_SIZE} samples) ==");
    println!(
        "load average (1 min): {load_start} at start, {} at end",
        load_average()
    );
    println!(
        "| participants | ours µs/tick | naive µs/tick | naive/ours | ours % of a core | naive % of a core | ours wall µs | naive wall µs | encodes ours / naive | heap allocs/tick (ours) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.1}× | {:.2} % | {:.1} % | {:.0} | {:.0} | {} / {} | {} |",
            r.n,
            us(r.ours_cpu),
            us(r.naive_cpu),
            r.naive_cpu.as_secs_f64() / r.ours_cpu.as_secs_f64().max(1e-12),
            core(r.ours_cpu),
            core(r.naive_cpu),
            us(r.ours_wall),
            us(r.naive_wall),
            r.ours_encodes,
            r.n,
            r.ours_allocs_per_tick,
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "inputs: {} speakers selected; mean packet {:.0} B (talkers), {:.0} B (quiet)",
            r.ours_speakers, r.talker_bytes, r.quiet_bytes
        );
    }
    if let Some(r) = rows.iter().find(|r| r.n == 100) {
        let pct = core(r.ours_cpu);
        println!(
            "goal: a 100-person room ≤ 15 % of one core: {:.2} % → {}",
            pct,
            if pct <= 15.0 { "met" } else { "NOT met" }
        );
    }
    println!();
    println!(
        "== Memory per mixed participant ({} inputs in one RoomMixer) ==",
        memory.inputs
    );
    println!(
        "Rust heap, counted by the global allocator (jitter buffer, PCM, map and slot growth; not libopus): {}",
        kib(memory.heap_per_input)
    );
    println!(
        "process RSS delta, add_input only (Rust heap + libopus encoder and decoder via C malloc): {}",
        kib(memory.rss_add_per_input)
    );
    println!(
        "process RSS delta, after {CYCLE} ticks of traffic through every input: {}",
        kib(memory.rss_ticked_per_input)
    );
    println!(
        "naive mixer, RSS delta per participant (decoder + encoder + buffers): {}",
        kib(memory.rss_naive_per_participant)
    );
}
