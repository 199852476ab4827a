//! The fuzz targets' properties on stable, bounded: each test feeds the same
//! check function as its fuzz target (`props/checks.rs`) with the seed
//! corpus (`fuzz/corpus/TARGET/`) and with inputs made by a seeded
//! generator, so the invariants are asserted in the normal test command and
//! the runs are reproducible. Each test stays well under two seconds in a
//! debug build.

#[path = "props/checks.rs"]
mod checks;

use std::path::PathBuf;

/// xorshift64*, as `switchboard::media::XorShift` (which is crate-private).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `bytes` with a few random changes: flip, replace, insert, delete,
    /// duplicate a range.
    fn mutate(&mut self, bytes: &mut Vec<u8>) {
        for _ in 0..=self.below(4) {
            let len = bytes.len() as u64;
            match self.below(5) {
                0 if len > 0 => {
                    let at = self.below(len) as usize;
                    bytes[at] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let at = self.below(len) as usize;
                    bytes[at] = self.byte();
                }
                2 => {
                    let at = self.below(len + 1) as usize;
                    let b = self.byte();
                    bytes.insert(at, b);
                }
                3 if len > 0 => {
                    let at = self.below(len) as usize;
                    let n = (self.below(8) as usize).min(bytes.len() - at);
                    bytes.drain(at..at + n);
                }
                4 if len > 0 => {
                    let at = self.below(len) as usize;
                    let n = (self.below(16) as usize).min(bytes.len() - at);
                    let copy = bytes[at..at + n].to_vec();
                    let to = self.below(bytes.len() as u64 + 1) as usize;
                    bytes.splice(to..to, copy);
                }
                _ => {}
            }
        }
    }
}

/// The seed corpus of a fuzz target.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("seed file"))
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `check` on every seed, then on `rounds` mutations of seeds.
fn seeds_and_mutations(target: &str, seed: u64, rounds: usize, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        check(s);
    }
    let mut rng = Rng::new(seed);
    for _ in 0..rounds {
        let mut input = rng.pick(&seeds).clone();
        rng.mutate(&mut input);
        check(&input);
    }
}

#[test]
fn signaling_round_trips_and_limits() {
    let check = |b: &[u8]| {
        if let Ok(text) = std::str::from_utf8(b) {
            checks::signaling(text);
        }
    };
    seeds_and_mutations("signaling", 11, 4_000, check);
    // Structured: every client type with assorted field values.
    let mut rng = Rng::new(12);
    let values = [
        r#""r""#,
        r#""demo-1""#,
        r#""a b""#,
        "7",
        "null",
        "true",
        r#""""#,
        "[1]",
        "{}",
        r#"{"type":"offer","sdp":"v=0"}"#,
        "1.5e300",
        "-0",
        r#""\u00e9""#,
        r#""p1""#,
    ];
    let fields = [
        "room", "name", "to", "data", "peer", "id", "token", "mode", "audio",
    ];
    for _ in 0..2_000 {
        let mut text = format!(r#"{{"type":"{}""#, rng.pick(&checks_types()));
        for _ in 0..rng.below(5) {
            text.push_str(&format!(
                r#","{}":{}"#,
                rng.pick(&fields),
                rng.pick(&values)
            ));
        }
        text.push('}');
        checks::signaling(&text);
    }
}

fn checks_types() -> Vec<&'static str> {
    let mut t = switchboard_proto::CLIENT_TYPES.to_vec();
    t.push("dance");
    t
}

/// Random offers made of the lines that matter to the caps, with the line
/// endings clients and attackers use.
fn random_offer(rng: &mut Rng) -> String {
    let header = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
    let lines = [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "m=video 0 UDP/TLS/RTP/SAVPF 96",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "m=audio",
        "a=sendrecv",
        "a=sendonly",
        "a=recvonly",
        "a=inactive",
        "a=mid:0",
        "a=rtpmap:96 VP8/90000",
        "a=candidate:1 1 udp 1 127.0.0.1 9 typ host",
        "c=IN IP4 0.0.0.0",
        "a=sendrecv ",
        "",
    ];
    let ends = ["\r\n", "\r\n", "\r\n", "\n", "\r\r\n", "\r", ""];
    let mut sdp = String::new();
    if rng.below(4) != 0 {
        sdp.push_str(header);
    }
    for _ in 0..rng.below(12) {
        let (line, end): (&&str, &&str) = (rng.pick(&lines), rng.pick(&ends));
        sdp.push_str(line);
        sdp.push_str(end);
    }
    sdp
}

#[test]
fn sdp_offer_caps_hold() {
    let check = |b: &[u8]| {
        if let Ok(text) = std::str::from_utf8(b) {
            checks::sdp_offer(text);
        }
    };
    seeds_and_mutations("sdp_offer", 21, 800, check);
    let mut rng = Rng::new(22);
    for _ in 0..1_500 {
        checks::sdp_offer(&random_offer(&mut rng));
    }
}

#[test]
fn demux_routes_only_what_it_should() {
    seeds_and_mutations("demux", 31, 1_000, checks::demux);
    // Random operation sequences.
    let mut rng = Rng::new(32);
    for _ in 0..1_000 {
        let ops: Vec<u8> = (0..rng.below(300)).map(|_| rng.byte()).collect();
        checks::demux(&ops);
    }
}

/// Operations for [`checks::rtp_rewrite`] that look like real streams:
/// mostly consecutive sequence numbers per SSRC, some loss, reordering,
/// source switches and restarts, and whole packets now and then.
fn rewrite_ops(rng: &mut Rng) -> Vec<u8> {
    let mut ops = vec![rng.byte()];
    let mut seqs = [0u16; 4].map(|_| rng.next_u64() as u16);
    let mut ssrc = 0usize;
    for _ in 0..rng.below(400) {
        if rng.below(50) == 0 {
            ssrc = rng.below(4) as usize;
        }
        if rng.below(300) == 0 {
            seqs[ssrc] = rng.next_u64() as u16;
        }
        let seq = match rng.below(20) {
            0 => seqs[ssrc].wrapping_sub(rng.below(40) as u16),
            1 => seqs[ssrc].wrapping_add(rng.below(40) as u16),
            _ => seqs[ssrc],
        };
        seqs[ssrc] = seqs[ssrc].wrapping_add(1);
        let delay = (rng.below(8) as u8) << 3;
        if rng.below(10) == 0 {
            // A whole RTP packet on this SSRC.
            let mut p = vec![0x80 | (rng.byte() & 0x3f), rng.byte()];
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
            p.extend_from_slice(&(ssrc as u32).to_be_bytes());
            for _ in 0..rng.below(30) {
                p.push(rng.byte());
            }
            ops.push(delay | 0x04 | (rng.byte() & 0x03));
            ops.push(p.len() as u8);
            ops.extend_from_slice(&p);
        } else {
            ops.push(delay | ssrc as u8);
            ops.extend_from_slice(&seq.to_be_bytes());
            ops.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
        }
    }
    ops
}

#[test]
fn rtp_rewrite_keeps_streams_continuous() {
    seeds_and_mutations("rtp_rewrite", 41, 1_000, checks::rtp_rewrite);
    let mut rng = Rng::new(42);
    for _ in 0..300 {
        let mut ops = rewrite_ops(&mut rng);
        checks::rtp_rewrite(&ops);
        rng.mutate(&mut ops);
        checks::rtp_rewrite(&ops);
    }
}

#[test]
fn codec_descriptors_are_exact() {
    seeds_and_mutations("vp8", 51, 10_000, checks::codecs);
    let mut rng = Rng::new(52);
    for _ in 0..10_000 {
        let p: Vec<u8> = (0..rng.below(40)).map(|_| rng.byte()).collect();
        checks::codecs(&p);
    }
}

#[test]
fn mixer_input_survives_any_payload() {
    seeds_and_mutations("mixer_input", 61, 40, checks::mixer_input);
    let mut rng = Rng::new(62);
    for _ in 0..40 {
        // Two talkers with mostly consecutive packets of random bytes.
        let mut ops = Vec::new();
        let mut seq = [rng.next_u64() as u16, rng.next_u64() as u16];
        for _ in 0..rng.below(80) {
            if rng.below(3) == 0 {
                ops.push(0x80);
                continue;
            }
            let who = rng.below(2) as usize;
            let kind = 1 + rng.below(7) as u8; // sometimes 7: oversize
            ops.push(((who as u8) << 4) | kind | ((rng.byte() & 1) << 3));
            let s = seq[who].wrapping_add(rng.below(3) as u16);
            seq[who] = seq[who].wrapping_add(1);
            ops.extend_from_slice(&s.to_be_bytes());
            ops.extend_from_slice(&s.to_be_bytes());
            if kind != 7 {
                let n = rng.below(80) as u8;
                ops.push(n);
                ops.extend((0..n).map(|_| rng.byte()));
            }
        }
        checks::mixer_input(&ops);
    }
}

#[test]
fn socketio_packets_hold_nothing_and_round_trip() {
    seeds_and_mutations("socketio", 71, 3000, checks::socketio);
    // Generated classic events with rooms of every kind.
    let mut rng = Rng::new(72);
    let rooms = [
        "\"demo\"",
        "4711",
        "-1",
        "1.5",
        "\"\"",
        "\"a b\"",
        "null",
        "{}",
        "[1]",
        "18446744073709551615",
        "\"x\\u0000\"",
    ];
    for _ in 0..2000 {
        let event = rng.pick(&["join", "leave", "message", "bye", "x"]);
        let room = rng.pick(&rooms);
        let prefix = rng.pick(&["2", "2/,", "21", "/x,2", "5"]);
        checks::socketio(format!("{prefix}[\"{event}\",{room},{{}}]").as_bytes());
    }
}
