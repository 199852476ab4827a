//! Audio mixing with real WebRTC peers (our Rust client on 127.0.0.1): in an
//! `audio: "mix"` room every participant receives exactly one audio track,
//! stream id `mix`, holding everyone else's audio and not its own; `speakers`
//! names whoever gets loud; corrupt audio from one publisher is dropped and
//! counted while the others' mix is unharmed.
//!
//! Publishers send real Opus (sine tones encoded with libopus); listeners
//! decode what they receive and measure tone power with the Goertzel filter.
//! One publisher is Python aiortc sending PCMU only: it is not mixed.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::aiortc::{require_aiortc, spawn_peer, Peer};
use common::media::until_connected;
use common::*;
use opus::{Application, Channels, Decoder, Encoder};
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use switchboard_client::{Client, Event, JoinOptions, Kind};
use switchboard_proto::{AudioMode, ServerMessage, MIX_STREAM};

const RATE: u32 = 48_000;
const FRAME: usize = 960; // 20 ms

/// A participant's voice: a sine tone, Opus-encoded 20 ms at a time.
struct Tone {
    freq: f32,
    amp: f32,
    phase: u64,
    encoder: Encoder,
    pcm: Vec<i16>,
    out: Vec<u8>,
}

impl Tone {
    fn new(freq: f32, amp: f32) -> Tone {
        Tone {
            freq,
            amp,
            phase: 0,
            encoder: Encoder::new(RATE, Channels::Mono, Application::Voip).expect("encoder"),
            pcm: vec![0; FRAME],
            out: vec![0; 1500],
        }
    }

    /// The next 20 ms packet and its RTP timestamp.
    fn next(&mut self) -> (Bytes, u32) {
        let ts = self.phase as u32;
        for s in &mut self.pcm {
            let t = self.phase as f32 / RATE as f32;
            *s = (self.amp * (2.0 * std::f32::consts::PI * self.freq * t).sin()) as i16;
            self.phase += 1;
        }
        let n = self
            .encoder
            .encode(&self.pcm, &mut self.out)
            .expect("encode");
        (Bytes::copy_from_slice(&self.out[..n]), ts)
    }
}

/// Power of `freq` in `pcm`, in dB (Goertzel).
fn tone_db(pcm: &[i16], freq: f32) -> f64 {
    let w = 2.0 * std::f64::consts::PI * f64::from(freq) / f64::from(RATE);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in pcm {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (pcm.len() as f64).powi(2);
    10.0 * (power + 1e-9).log10()
}

/// What one participant received.
#[derive(Default)]
struct Heard {
    /// (stream id, kind) of every track that appeared.
    tracks: Vec<(String, Kind)>,
    /// Payloads on the mix track, in arrival order, with arrival times.
    mix: Vec<(Instant, Bytes)>,
    /// Audio packets on any other stream (there must be none).
    other_audio: usize,
    /// `speakers` events: (when, ids loudest first).
    speakers: Vec<(Instant, Vec<String>)>,
}

impl Heard {
    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::TrackAdded {
                stream_id, kind, ..
            } => self.tracks.push((stream_id, kind)),
            Event::Rtp {
                stream_id,
                kind: Kind::Audio,
                packet,
                at,
                ..
            } => {
                if stream_id == MIX_STREAM {
                    self.mix.push((at, packet.payload));
                } else {
                    self.other_audio += 1;
                }
            }
            Event::Signal(ServerMessage::Speakers(s)) => self.speakers.push((
                Instant::now(),
                s.speakers.into_iter().map(|s| s.id.to_string()).collect(),
            )),
            _ => {}
        }
    }

    /// The mix decoded, from packets that arrived after `from`.
    fn decoded_since(&self, from: Instant) -> Vec<i16> {
        let mut decoder = Decoder::new(RATE, Channels::Mono).expect("decoder");
        let mut pcm = Vec::new();
        let mut frame = vec![0i16; 5760];
        for (at, payload) in &self.mix {
            let n = decoder
                .decode(payload, &mut frame, false)
                .expect("the mix is valid Opus");
            if *at >= from {
                pcm.extend_from_slice(&frame[..n]);
            }
        }
        pcm
    }
}

async fn mix_server() -> RunningServer {
    server(ServeOptions::default()).await
}

async fn join(server: &RunningServer, room: &str, name: &str, publish_audio: bool) -> Client {
    let opts = JoinOptions {
        audio: Some(AudioMode::Mix),
        publish_audio,
        publish_video: false,
        ..JoinOptions::sfu(&server.ws_url(), room, name)
    };
    let mut c = Client::join(opts).await.expect("joins");
    until_connected(&mut c).await;
    c
}

/// Sends `frames` 20 ms frames from each `(client index, tone)`, paced in
/// real time, while every client's events are absorbed.
async fn talk(
    clients: &mut [Client],
    heard: &mut [Heard],
    tones: &mut [(usize, &mut Tone)],
    frames: u32,
) {
    let start = Instant::now();
    for i in 0..frames {
        for (who, tone) in tones.iter_mut() {
            let (payload, ts) = tone.next();
            clients[*who]
                .send_rtp(Kind::Audio, payload, false, ts)
                .expect("send audio");
        }
        let due = start + Duration::from_millis(20 * u64::from(i + 1));
        drain_until(clients, heard, due).await;
    }
}

async fn drain_until(clients: &mut [Client], heard: &mut [Heard], until: Instant) {
    loop {
        for (c, h) in clients.iter_mut().zip(heard.iter_mut()) {
            while let Some(ev) = c.next_event_within(Duration::from_millis(1)).await {
                h.absorb(ev);
            }
        }
        if Instant::now() >= until {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_hears_everyone_but_itself_and_speakers_follow_the_loudest() {
    let server = mix_server().await;
    let room = format!("mix-{}", rand_id());
    let names = ["alice", "bob", "carol", "dave"];
    let mut clients = Vec::new();
    // alice, bob and carol talk; dave only listens (so he gets the shared mix).
    for (i, name) in names.iter().enumerate() {
        clients.push(join(&server, &room, name, i < 3).await);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    let mut heard: Vec<Heard> = names.iter().map(|_| Heard::default()).collect();
    let freqs = [440.0f32, 660.0, 880.0];
    let mut alice = Tone::new(freqs[0], 4000.0);
    let mut bob = Tone::new(freqs[1], 0.0); // silent at first
    let mut carol = Tone::new(freqs[2], 4000.0);

    // 1.5 s with bob silent, then bob talks louder than anyone.
    talk(
        &mut clients,
        &mut heard,
        &mut [(0, &mut alice), (1, &mut bob), (2, &mut carol)],
        75,
    )
    .await;
    let bob_starts = Instant::now();
    bob.amp = 12_000.0;
    talk(
        &mut clients,
        &mut heard,
        &mut [(0, &mut alice), (1, &mut bob), (2, &mut carol)],
        150,
    )
    .await;
    drain_until(
        &mut clients,
        &mut heard,
        Instant::now() + Duration::from_millis(300),
    )
    .await;

    // Exactly one audio track each, the mix; nothing forwarded.
    for (name, h) in names.iter().zip(&heard) {
        let audio: Vec<&String> = h
            .tracks
            .iter()
            .filter(|(_, k)| *k == Kind::Audio)
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            audio,
            [MIX_STREAM],
            "{name}: exactly one audio track, stream id mix"
        );
        assert_eq!(h.other_audio, 0, "{name}: no forwarded audio in a mix room");
        assert!(
            h.mix.len() > 150,
            "{name}: the mix flows ({} packets)",
            h.mix.len()
        );
    }

    // The last second (bob loud): each hears the other two tones, not its own.
    let window = bob_starts + Duration::from_millis(1500);
    for (i, (name, h)) in names.iter().zip(&heard).enumerate() {
        let pcm = h.decoded_since(window);
        assert!(
            pcm.len() >= RATE as usize / 2,
            "{name}: {} samples decoded",
            pcm.len()
        );
        let db: Vec<f64> = freqs.iter().map(|f| tone_db(&pcm, *f)).collect();
        let off = tone_db(&pcm, 1234.0);
        eprintln!(
            "{name}: 440 Hz {:.1} dB, 660 Hz {:.1} dB, 880 Hz {:.1} dB, 1234 Hz {off:.1} dB",
            db[0], db[1], db[2]
        );
        for (j, f) in freqs.iter().enumerate() {
            if i == j {
                continue;
            }
            assert!(
                db[j] > off + 20.0,
                "{name} hears the {f} Hz tone: {:.1} dB vs {off:.1} dB off-tone",
                db[j]
            );
            if i < 3 {
                assert!(
                    db[i] <= db[j] - 15.0,
                    "{name}'s own {} Hz tone ({:.1} dB) is at least 15 dB below {f} Hz ({:.1} dB)",
                    freqs[i],
                    db[i],
                    db[j]
                );
            }
        }
    }

    // `speakers`: bob absent while silent, then named first once loud.
    for (name, h) in names.iter().zip(&heard) {
        let before: Vec<&Vec<String>> = h
            .speakers
            .iter()
            .filter(|(at, _)| *at < bob_starts)
            .map(|(_, s)| s)
            .collect();
        let last_before = before.last().unwrap_or_else(|| {
            panic!(
                "{name}: a speakers event before bob talks: {:?}",
                h.speakers
            )
        });
        assert!(
            !last_before.contains(&ids[1]),
            "{name}: silent bob is not a speaker: {last_before:?}"
        );
        assert!(
            last_before.contains(&ids[0]) && last_before.contains(&ids[2]),
            "{name}: alice and carol speak: {last_before:?}"
        );
        assert!(
            h.speakers
                .iter()
                .any(|(at, s)| *at >= bob_starts && s.first() == Some(&ids[1])),
            "{name}: a speakers event names bob loudest once he talks: {:?}",
            h.speakers
        );
    }

    let text = metrics(&server).await;
    assert!(metric(&text, "switchboard_mixer_decodes_total") > 0.0);
    assert!(metric(&text, "switchboard_mixer_encodes_total") > 0.0);
    assert!(metric(&text, "switchboard_mixer_tick_seconds_count") > 100.0);
    assert_eq!(metric(&text, "switchboard_mixer_rooms"), 1.0);
    eprintln!(
        "mixer tick histograms: {}",
        text.lines()
            .filter(|l| l.starts_with("switchboard_mixer_tick_"))
            .collect::<Vec<_>>()
            .join(" | ")
    );

    for c in &clients {
        c.leave();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_opus_is_dropped_and_counted_and_the_mix_survives() {
    let server = mix_server().await;
    let room = format!("mixbad-{}", rand_id());
    let names = ["alice", "bob", "mallory"];
    let mut clients = Vec::new();
    for name in names {
        clients.push(join(&server, &room, name, true).await);
    }
    let mut heard: Vec<Heard> = names.iter().map(|_| Heard::default()).collect();
    let mut alice = Tone::new(440.0, 5000.0);
    let mut bob = Tone::new(660.0, 5000.0);
    let start = Instant::now();
    let mut ts = 0u32;
    for i in 0..150u32 {
        for (who, tone) in [(0usize, &mut alice), (1, &mut bob)] {
            let (payload, t) = tone.next();
            clients[who]
                .send_rtp(Kind::Audio, payload, false, t)
                .expect("send");
        }
        // Mallory: Opus that libopus refuses (a code-3 packet with zero
        // frames). Non-Opus payload types never get this far: the WebRTC
        // stack drops payload types not negotiated on the track, and the
        // mixer's own payload-type check is covered in the transport's
        // unit tests.
        clients[2]
            .send_rtp(
                Kind::Audio,
                Bytes::from_static(&[0x03, 0x00, 0xff, 0xff]),
                false,
                ts,
            )
            .expect("send");
        ts = ts.wrapping_add(FRAME as u32);
        drain_until(
            &mut clients,
            &mut heard,
            start + Duration::from_millis(20 * u64::from(i + 1)),
        )
        .await;
    }
    drain_until(
        &mut clients,
        &mut heard,
        Instant::now() + Duration::from_millis(300),
    )
    .await;

    let text = metrics(&server).await;
    let corrupt = metric(
        &text,
        "switchboard_mixer_input_dropped_total{reason=\"corrupt\"}",
    );
    eprintln!("dropped as corrupt: {corrupt}");
    assert!(
        corrupt >= 100.0,
        "corrupt Opus is counted: {corrupt} of 150"
    );

    // Alice and bob each still hear the other clearly; mallory hears both.
    let window = start + Duration::from_millis(1500);
    let checks: [(usize, f32); 4] = [(0, 660.0), (1, 440.0), (2, 440.0), (2, 660.0)];
    for (who, freq) in checks {
        let pcm = heard[who].decoded_since(window);
        assert!(
            pcm.len() >= RATE as usize / 2,
            "{}: {} samples",
            names[who],
            pcm.len()
        );
        let (db, off) = (tone_db(&pcm, freq), tone_db(&pcm, 1234.0));
        assert!(
            db > off + 20.0,
            "{} hears {freq} Hz: {db:.1} dB vs {off:.1} dB off-tone",
            names[who]
        );
    }
    let per_client: HashMap<&str, usize> = names
        .iter()
        .zip(&heard)
        .map(|(n, h)| (*n, h.mix.len()))
        .collect();
    assert!(
        per_client.values().all(|n| *n > 100),
        "the mix flowed to all: {per_client:?}"
    );

    // The room is unharmed: a fourth joins and hears alice.
    let mut dave = join(&server, &room, "dave", false).await;
    let mut dave_heard = Heard::default();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut t = Instant::now();
    while Instant::now() < until {
        let (payload, ts) = alice.next();
        clients[0]
            .send_rtp(Kind::Audio, payload, false, ts)
            .expect("send");
        t += Duration::from_millis(20);
        while Instant::now() < t {
            if let Some(ev) = dave.next_event_within(Duration::from_millis(2)).await {
                dave_heard.absorb(ev);
            }
        }
    }
    let pcm = dave_heard.decoded_since(Instant::now() - Duration::from_millis(800));
    let (db, off) = (tone_db(&pcm, 440.0), tone_db(&pcm, 1234.0));
    assert!(
        db > off + 20.0,
        "a newcomer hears alice: {db:.1} dB vs {off:.1} dB"
    );
    for c in clients.iter().chain([&dave]) {
        c.leave();
    }
}

/// A publisher whose audio is not Opus (aiortc negotiating PCMU only, as a
/// legacy or misconfigured peer might) is dropped from the mix and counted;
/// it is told why it cannot hear the (Opus) mix, and the others still hear
/// each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_is_not_opus_is_not_mixed_and_is_counted() {
    require_aiortc();
    let server = mix_server().await;
    let room = format!("mixpcmu-{}", rand_id());
    let mut clients = vec![
        join(&server, &room, "alice", true).await,
        join(&server, &room, "bob", false).await,
    ];
    let mut heard = vec![Heard::default(), Heard::default()];
    let Peer {
        mut child,
        stdout,
        stderr,
    } = spawn_peer(&[
        "--url",
        &server.ws_url(),
        "--room",
        &room,
        "--name",
        "legacy",
        "--audio",
        "mix",
        "--audio-codec",
        "PCMU",
        "--freq",
        "440",
        "--no-video",
        "--duration",
        "5",
        "--timeout",
        "45",
    ]);

    // Alice talks (660 Hz) until the aiortc peer has run its course.
    let mut alice = Tone::new(660.0, 5000.0);
    let started = Instant::now();
    let mut frames = 0u32;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the aiortc peer") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the aiortc peer did not finish within 60 s:\n{}",
            {
                let _ = child.kill().await;
                stderr.await.unwrap_or_default()
            }
        );
        let (payload, ts) = alice.next();
        clients[0]
            .send_rtp(Kind::Audio, payload, false, ts)
            .expect("send");
        frames += 1;
        drain_until(
            &mut clients,
            &mut heard,
            started + Duration::from_millis(20 * u64::from(frames)),
        )
        .await;
    };
    let out = stdout.await.unwrap_or_default();
    let err = stderr.await.unwrap_or_default();
    // Exit status 2: the run went fine but the server sent an `error`.
    assert_eq!(
        status.code(),
        Some(2),
        "the aiortc peer ({status}):\n{err}\n{out}"
    );
    let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("aiortc's report is not JSON ({e}):\n{out}\n{err}"));

    let text = metrics(&server).await;
    let not_opus = metric(
        &text,
        "switchboard_mixer_input_dropped_total{reason=\"not-opus\"}",
    );
    let sent = result["sent"]["audio"].as_u64().unwrap_or(0);
    eprintln!("aiortc sent {sent} PCMU packets; the mixer dropped {not_opus} as not Opus");
    assert!(sent > 100, "aiortc published PCMU: {result}");
    assert!(
        not_opus >= 0.8 * sent as f64,
        "PCMU packets are dropped and counted: {not_opus} of {sent}"
    );

    // The PCMU peer is told, in an `error`, why it hears nothing.
    let errors = result["errors"].as_array().cloned().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e["code"] == "bad-request"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("without Opus"))),
        "aiortc is told it cannot hear the Opus mix: {result}"
    );
    assert_eq!(
        result["connection"], "connected",
        "its connection stays up: {result}"
    );

    // Bob hears alice and not the PCMU tone.
    let pcm = heard[1].decoded_since(Instant::now() - Duration::from_secs(2));
    let (alice_db, legacy_db) = (tone_db(&pcm, 660.0), tone_db(&pcm, 440.0));
    eprintln!("bob: 660 Hz (alice) {alice_db:.1} dB, 440 Hz (PCMU peer) {legacy_db:.1} dB");
    assert!(
        alice_db > legacy_db + 30.0,
        "bob hears alice ({alice_db:.1} dB) and not the PCMU peer ({legacy_db:.1} dB)"
    );
    for c in &clients {
        c.leave();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_more_talkers_than_mix_speakers_the_loudest_are_mixed() {
    let server = server(ServeOptions {
        mix_speakers: Some(2),
        ..Default::default()
    })
    .await;
    let room = format!("mixk-{}", rand_id());
    let names = ["alice", "bob", "carol", "dave", "eve"];
    let mut clients = Vec::new();
    // Four talk; eve only listens. Mixed, carol and dave would be 6 and
    // 8.5 dB below bob; left out, they are codec leakage, 40 dB and more.
    for (i, name) in names.iter().enumerate() {
        clients.push(join(&server, &room, name, i < 4).await);
    }
    let mut heard: Vec<Heard> = names.iter().map(|_| Heard::default()).collect();
    let freqs = [440.0f32, 660.0, 880.0, 1100.0];
    let mut tones: Vec<Tone> = freqs
        .iter()
        .zip([12_000.0, 8_000.0, 4_000.0, 3_000.0])
        .map(|(f, a)| Tone::new(*f, a))
        .collect();
    let levels = |pcm: &[i16]| -> (Vec<f64>, f64) {
        (
            freqs.iter().map(|f| tone_db(pcm, *f)).collect(),
            tone_db(pcm, 1234.0),
        )
    };
    // 3 s: alice and bob loudest.
    {
        let mut refs: Vec<(usize, &mut Tone)> = tones.iter_mut().enumerate().collect();
        talk(&mut clients, &mut heard, &mut refs, 150).await;
    }
    let phase1_end = Instant::now();
    let pcm: Vec<i16> = heard[4].decoded_since(phase1_end - Duration::from_millis(1000));
    let (db, off) = levels(&pcm);
    eprintln!("eve, alice+bob loud: {db:.1?} dB, off-tone {off:.1} dB");
    assert!(pcm.len() >= RATE as usize / 2, "eve decoded {}", pcm.len());
    assert!(
        db[0] > off + 20.0 && db[1] > off + 20.0,
        "eve hears the two loudest: {db:?} vs {off}"
    );
    assert!(
        db[2] < db[1] - 20.0 && db[3] < db[1] - 20.0,
        "the quieter two are left out of a 2-speaker mix: {db:?}"
    );

    // Then alice stops and carol gets loudest: carol and bob are mixed.
    tones[0].amp = 0.0;
    tones[2].amp = 15_000.0;
    {
        let mut refs: Vec<(usize, &mut Tone)> = tones.iter_mut().enumerate().collect();
        talk(&mut clients, &mut heard, &mut refs, 150).await;
    }
    let pcm: Vec<i16> = heard[4].decoded_since(Instant::now() - Duration::from_millis(1000));
    let (db, off) = levels(&pcm);
    eprintln!("eve, carol+bob loud: {db:.1?} dB, off-tone {off:.1} dB");
    assert!(
        db[2] > off + 20.0 && db[1] > off + 20.0,
        "eve hears carol and bob: {db:?} vs {off}"
    );
    assert!(db[3] < db[1] - 20.0, "dave is still left out: {db:?}");
    for c in &clients {
        c.leave();
    }
}
