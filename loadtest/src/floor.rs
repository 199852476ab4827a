//! `loadtest floor`: the yardstick a forwarding server is measured against.
//!
//! A bare UDP relay on one thread does the least any SFU must do for the
//! same load as `run` (rooms × participants, each publishing VP8 at
//! `--video-kbps` in 1,100-byte packets, plus Opus with `--audio`): receive a
//! packet, and for each other member of its room copy it, seal the copy with
//! AES-128-GCM (the cost of SRTP protect) and send it. Nothing else: no
//! RTCP, no ICE, no rewriting, no NACK history. Its CPU per output packet is
//! the floor; "server ÷ floor" from the same machine and load says how much a
//! server spends beyond the unavoidable.
//!
//! Three ways to send, each run in turn (`--mode`):
//! - `sendto`: one system call per output packet;
//! - `sendmmsg`: every output of the packets drained in one wake-up, one
//!   system call;
//! - `gso`: per destination, runs of equal-size outputs as one UDP GSO send
//!   (`UDP_SEGMENT`), which pays when a wake-up holds several packets for the
//!   same subscriber (high load).
//!
//! The receiving side is light: one thread polls every participant's socket
//! and counts datagrams without decrypting. The generator's own CPU (pacing,
//! sending, counting) is reported beside the relay's.

use std::io::{ErrorKind, IoSlice};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::socket::{sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrIn};

/// Largest input the relay reads; outputs add the 16-byte tag.
const MAX_PACKET: usize = 1500;
const TAG: usize = 16;
/// Inputs drained per wake-up (the batch the batched modes work on).
const MAX_BATCH: usize = 64;
/// Video packets: RTP header + VP8 payload, as `run`'s packetizer makes them.
const VIDEO_BYTES: usize = 1100;
/// Opus at 32 kbit/s in 20 ms frames, with its RTP header.
const AUDIO_BYTES: usize = 100;
const AUDIO_PPS: f64 = 50.0;
/// Segments in one GSO send (the kernel's limit is 64).
const MAX_SEGMENTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Sendto,
    Sendmmsg,
    Gso,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Sendto, Mode::Sendmmsg, Mode::Gso];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sendto => "sendto",
            Mode::Sendmmsg => "sendmmsg",
            Mode::Gso => "gso",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Rooms
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// Participants per room; each publishes and receives every other
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    /// VP8 bit rate per publisher, kbit/s (0 = no video)
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u32,
    /// Also publish Opus-sized audio (100-byte packets, 50/s)
    #[arg(long)]
    pub audio: bool,
    /// How long each mode runs
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// One way to send; all three in turn when not given
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Also write every figure as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one mode measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorRun {
    pub mode: &'static str,
    pub seconds: f64,
    pub inputs: u64,
    pub outputs: u64,
    /// Datagrams the participants received (outputs lost on the way: the
    /// difference; loopback drops only when a socket buffer overflows).
    pub received: u64,
    /// The relay thread's CPU (user + system) per output packet.
    pub relay_us_per_packet: f64,
    /// The relay thread's CPU over the run, in cores.
    pub relay_cores: f64,
    /// Inputs per wake-up of the relay.
    pub inputs_per_wakeup: f64,
    /// The generator's CPU (everything but the relay thread), in cores.
    pub generator_cores: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}: {1}")]
    Send(&'static str, nix::Error),
    #[error("nothing to send: --video-kbps 0 and no --audio")]
    NoLoad,
    #[error("the relay thread panicked")]
    Relay,
}

/// Runs the floor in each mode asked for; prints and returns the figures.
pub fn floor(args: &FloorArgs) -> Result<Vec<FloorRun>, FloorError> {
    if args.video_kbps == 0 && !args.audio {
        return Err(FloorError::NoLoad);
    }
    let modes: Vec<Mode> = args.mode.map_or(Mode::ALL.to_vec(), |m| vec![m]);
    let mut runs = Vec::new();
    for mode in modes {
        let run = run_mode(args, mode)?;
        println!(
            "floor {:>8}: {:>7} out/s  relay {:.2} µs/packet ({:.2} cores, {:.2} inputs/wake-up)  \
             generator {:.2} cores  delivered {}/{}",
            run.mode,
            (run.outputs as f64 / run.seconds).round(),
            run.relay_us_per_packet,
            run.relay_cores,
            run.inputs_per_wakeup,
            run.generator_cores,
            run.received,
            run.outputs,
        );
        runs.push(run);
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&runs).unwrap_or_default();
        std::fs::write(path, json)?;
    }
    Ok(runs)
}

fn run_mode(args: &FloorArgs, mode: Mode) -> Result<FloorRun, FloorError> {
    let relay = UdpSocket::bind("127.0.0.1:0")?;
    relay.set_read_timeout(Some(Duration::from_millis(50)))?;
    let relay_addr = relay.local_addr()?;
    let n = args.rooms * args.participants;
    let members: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddrV4> = members
        .iter()
        .map(|s| match s.local_addr() {
            Ok(SocketAddr::V4(a)) => Ok(a),
            Ok(other) => Err(std::io::Error::other(format!("not IPv4: {other}"))),
            Err(e) => Err(e),
        })
        .collect::<Result<_, _>>()?;
    for m in &members {
        m.set_nonblocking(true)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let process_before = cpu(UsageWho::RUSAGE_SELF);
    let started = Instant::now();

    let relay_thread = {
        let stop = stop.clone();
        let participants = args.participants;
        std::thread::spawn(move || relay_loop(&relay, mode, &addrs, participants, &stop))
    };
    let receiver = {
        let stop = stop.clone();
        let received = received.clone();
        let sockets: Vec<UdpSocket> = members
            .iter()
            .map(UdpSocket::try_clone)
            .collect::<Result<_, _>>()?;
        std::thread::spawn(move || receive_loop(&sockets, &received, &stop))
    };
    generate(&members, relay_addr, args, started + args.duration);
    // Outputs still in flight when the generator stops are counted.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let relayed = relay_thread.join().map_err(|_| FloorError::Relay)??;
    let _ = receiver.join();
    let seconds = started.elapsed().as_secs_f64();
    let process = cpu(UsageWho::RUSAGE_SELF) - process_before;
    Ok(FloorRun {
        mode: mode.as_str(),
        seconds,
        inputs: relayed.inputs,
        outputs: relayed.outputs,
        received: received.load(Ordering::Relaxed),
        relay_us_per_packet: if relayed.outputs > 0 {
            relayed.cpu * 1e6 / relayed.outputs as f64
        } else {
            0.0
        },
        relay_cores: relayed.cpu / seconds,
        inputs_per_wakeup: if relayed.wakeups > 0 {
            relayed.inputs as f64 / relayed.wakeups as f64
        } else {
            0.0
        },
        generator_cores: (process - relayed.cpu).max(0.0) / seconds,
    })
}

/// CPU seconds (user + system) of the process or the calling thread.
fn cpu(who: UsageWho) -> f64 {
    getrusage(who).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Every publisher's packets, paced, from its own socket, until `end`.
fn generate(members: &[UdpSocket], relay: SocketAddr, args: &FloorArgs, end: Instant) {
    let video_pps = f64::from(args.video_kbps) * 1000.0 / 8.0 / VIDEO_BYTES as f64;
    // (interval, size) per kind; publishers start spread over one interval.
    let mut kinds = Vec::new();
    if video_pps > 0.0 {
        kinds.push((Duration::from_secs_f64(1.0 / video_pps), VIDEO_BYTES));
    }
    if args.audio {
        kinds.push((Duration::from_secs_f64(1.0 / AUDIO_PPS), AUDIO_BYTES));
    }
    let start = Instant::now();
    let mut next: Vec<(Instant, usize, usize)> = Vec::new();
    for (i, _) in members.iter().enumerate() {
        for (k, (interval, _)) in kinds.iter().enumerate() {
            let offset = interval.mul_f64(i as f64 / members.len() as f64);
            next.push((start + offset, i, k));
        }
    }
    let mut buf = vec![0u8; MAX_PACKET];
    let mut seq = 0u32;
    while let Some(slot) = (0..next.len()).min_by_key(|&j| next[j].0) {
        let (at, member, kind) = next[slot];
        if at >= end {
            break;
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let (interval, size) = kinds[kind];
        let room = member / args.participants;
        buf[0..2].copy_from_slice(&(room as u16).to_be_bytes());
        buf[2..4].copy_from_slice(&((member % args.participants) as u16).to_be_bytes());
        buf[4..8].copy_from_slice(&seq.to_be_bytes());
        seq = seq.wrapping_add(1);
        let _ = members[member].send_to(&buf[..size], relay);
        next[slot].0 = at + interval;
    }
}

/// Counts what reaches the participants (no decryption).
fn receive_loop(sockets: &[UdpSocket], received: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_PACKET + TAG];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<nix::poll::PollFd> = sockets
            .iter()
            .map(|s| nix::poll::PollFd::new(s.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        if nix::poll::poll(&mut fds, 50u16).unwrap_or(0) <= 0 {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| {
                f.revents()
                    .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN))
            })
            .collect();
        drop(fds);
        for (s, _) in sockets.iter().zip(ready).filter(|(_, r)| *r) {
            while s.recv(&mut buf).is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Relayed {
    inputs: u64,
    outputs: u64,
    wakeups: u64,
    /// The relay thread's CPU seconds.
    cpu: f64,
}

/// One output waiting to be sent: `len` bytes of slot `slot`, to member `to`.
#[derive(Clone, Copy)]
struct Out {
    slot: usize,
    len: usize,
    to: usize,
}

/// The relay: drain, fan out with one seal per copy, send.
fn relay_loop(
    sock: &UdpSocket,
    mode: Mode,
    members: &[SocketAddrV4],
    participants: usize,
    stop: &AtomicBool,
) -> Result<Relayed, FloorError> {
    let before = cpu(UsageWho::RUSAGE_THREAD);
    let cipher = Aes128Gcm::new(&[7u8; 16].into());
    let dests: Vec<SockaddrIn> = members.iter().map(|a| SockaddrIn::from(*a)).collect();
    let fd = sock.as_raw_fd();
    let copies = participants.saturating_sub(1).max(1);
    // Preallocated: inputs of one wake-up, and every output they make.
    let mut inputs = vec![[0u8; MAX_PACKET]; MAX_BATCH];
    let mut input_len = [0usize; MAX_BATCH];
    let mut outputs = vec![[0u8; MAX_PACKET + TAG]; MAX_BATCH * copies];
    let mut outs: Vec<Out> = Vec::with_capacity(MAX_BATCH * copies);
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(MAX_BATCH * copies, None);
    let mut nonce_counter = 0u64;
    let (mut n_in, mut n_out, mut wakeups) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // Block for the first input, then take what is already there
        // (MSG_DONTWAIT: no mode switch, no extra system call).
        match sock.recv(&mut inputs[0]) {
            Ok(len) => input_len[0] = len,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut batch = 1;
        wakeups += 1;
        if mode != Mode::Sendto {
            while batch < MAX_BATCH {
                match nix::sys::socket::recv(fd, &mut inputs[batch], MsgFlags::MSG_DONTWAIT) {
                    Ok(len) => {
                        input_len[batch] = len;
                        batch += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        n_in += batch as u64;
        outs.clear();
        for (input, &len) in inputs.iter().zip(&input_len).take(batch) {
            if len < 4 {
                continue;
            }
            let room = usize::from(u16::from_be_bytes([input[0], input[1]]));
            let from = usize::from(u16::from_be_bytes([input[2], input[3]]));
            for member in (0..participants).filter(|&m| m != from) {
                let to = room * participants + member;
                if to >= dests.len() {
                    continue;
                }
                let slot = outs.len();
                let out = &mut outputs[slot];
                out[..len].copy_from_slice(&input[..len]);
                nonce_counter += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&nonce_counter.to_be_bytes());
                let (body, tag) = out.split_at_mut(len);
                if let Ok(t) =
                    cipher.encrypt_in_place_detached(Nonce::from_slice(&nonce), &[], body)
                {
                    tag[..TAG].copy_from_slice(&t);
                }
                outs.push(Out {
                    slot,
                    len: len + TAG,
                    to,
                });
            }
        }
        n_out += match mode {
            Mode::Sendto => send_each(fd, &outputs, &outs, &dests)?,
            Mode::Sendmmsg => send_mmsg(fd, &mut headers, &outputs, &outs, &dests)?,
            Mode::Gso => send_gso(fd, &outputs, &mut outs, &dests)?,
        };
    }
    Ok(Relayed {
        inputs: n_in,
        outputs: n_out,
        wakeups,
        cpu: cpu(UsageWho::RUSAGE_THREAD) - before,
    })
}

fn send_each(
    fd: i32,
    buffers: &[[u8; MAX_PACKET + TAG]],
    outs: &[Out],
    dests: &[SockaddrIn],
) -> Result<u64, FloorError> {
    let mut sent = 0;
    for o in outs {
        let iov = [IoSlice::new(&buffers[o.slot][..o.len])];
        if sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&dests[o.to])).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

fn send_mmsg(
    fd: i32,
    headers: &mut MultiHeaders<SockaddrIn>,
    buffers: &[[u8; MAX_PACKET + TAG]],
    outs: &[Out],
    dests: &[SockaddrIn],
) -> Result<u64, FloorError> {
    if outs.is_empty() {
        return Ok(0);
    }
    let iovs: Vec<[IoSlice<'_>; 1]> = outs
        .iter()
        .map(|o| [IoSlice::new(&buffers[o.slot][..o.len])])
        .collect();
    let addrs: Vec<Option<SockaddrIn>> = outs.iter().map(|o| Some(dests[o.to])).collect();
    let results = sendmmsg(fd, headers, &iovs, &addrs, [], MsgFlags::empty())
        .map_err(|e| FloorError::Send("sendmmsg", e))?;
    Ok(results.count() as u64)
}

/// Per destination, runs of equal-size outputs (the last of a run may be
/// shorter) in one `UDP_SEGMENT` send each.
fn send_gso(
    fd: i32,
    buffers: &[[u8; MAX_PACKET + TAG]],
    outs: &mut [Out],
    dests: &[SockaddrIn],
) -> Result<u64, FloorError> {
    // Grouped by destination, in order within each.
    outs.sort_by_key(|o| o.to);
    let mut sent = 0;
    let mut i = 0;
    while i < outs.len() {
        let (to, size) = (outs[i].to, outs[i].len);
        let mut j = i + 1;
        while j < outs.len()
            && j - i < MAX_SEGMENTS
            && outs[j].to == to
            && outs[j - 1].len == size
            && outs[j].len <= size
        {
            j += 1;
        }
        let iov: Vec<IoSlice<'_>> = outs[i..j]
            .iter()
            .map(|o| IoSlice::new(&buffers[o.slot][..o.len]))
            .collect();
        let segment = size as u16;
        let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
        let cmsgs: &[ControlMessage<'_>] = if j - i > 1 { &cmsg } else { &[] };
        match sendmsg(fd, &iov, cmsgs, MsgFlags::empty(), Some(&dests[to])) {
            Ok(_) => sent += (j - i) as u64,
            Err(e) => return Err(FloorError::Send("sendmsg with UDP_SEGMENT", e)),
        }
        i = j;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short real run of every mode: every output reaches its
    /// participant, and each input makes one copy per other member.
    #[test]
    fn every_mode_relays_each_packet_to_every_other_member() {
        let args = FloorArgs {
            rooms: 2,
            participants: 3,
            video_kbps: 500,
            audio: true,
            duration: Duration::from_millis(600),
            mode: None,
            json: None,
        };
        let runs = floor(&args).expect("floor runs");
        assert_eq!(runs.len(), 3);
        for r in runs {
            assert!(r.inputs > 50, "{}: {} inputs", r.mode, r.inputs);
            assert_eq!(r.outputs, r.inputs * 2, "{}: two copies per input", r.mode);
            assert_eq!(r.received, r.outputs, "{}: every copy arrived", r.mode);
            assert!(r.relay_us_per_packet > 0.0, "{}", r.mode);
        }
    }
}
