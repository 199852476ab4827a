//! The SFU media plane with real WebRTC peers (our Rust client on
//! 127.0.0.1): every participant's audio and video reach every other
//! participant intact, late joiners get everyone, leavers' tracks end, and
//! the chat channel is relayed.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::media::{parse, payload, until_connected};
use common::*;
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use switchboard_client::{Client, Event, JoinOptions, Kind};

/// Packets each publisher sends per kind and stream in the steady-state check.
const AUDIO_PACKETS: u32 = 250; // 5 s at 50 packets/s
const VIDEO_PACKETS: u32 = 150; // 5 s at 30 packets/s

/// The server with `workers` media workers. Every test here runs with one
/// and with two (see `both_ways!` at the end), so rooms on different
/// workers and the reader's hand-off between them are covered.
async fn media_server(workers: usize) -> RunningServer {
    server(ServeOptions {
        media_workers: Some(workers),
        ..ServeOptions::default()
    })
    .await
}

async fn join(server: &RunningServer, room: &str, name: &str) -> Client {
    Client::join(JoinOptions::sfu(&server.ws_url(), room, name))
        .await
        .expect("joins")
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    /// (stream id, kind) of each track that appeared.
    tracks: HashSet<(String, Kind)>,
    /// (sender name, kind) → sequence numbers received intact.
    packets: HashMap<(String, Kind), HashSet<u32>>,
    corrupt: usize,
    removed: usize,
    chat: Vec<String>,
}

impl Seen {
    /// Packets from `name` of `kind` received intact with sequence numbers in
    /// `from..from + n` (one round of `publish`; late retransmissions of an
    /// earlier round do not count).
    fn got(&self, name: &str, kind: Kind, from: u32, n: u32) -> usize {
        self.packets
            .get(&(name.to_owned(), kind))
            .map_or(0, |seqs| {
                seqs.iter()
                    .filter(|q| (from..from + n).contains(*q))
                    .count()
            })
    }

    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::TrackAdded {
                stream_id, kind, ..
            } => {
                self.tracks.insert((stream_id, kind));
            }
            Event::TrackRemoved { .. } => self.removed += 1,
            Event::Rtp { kind, packet, .. } => match parse(kind, &packet.payload) {
                Some((name, seq)) => {
                    self.packets.entry((name, kind)).or_default().insert(seq);
                }
                None => self.corrupt += 1,
            },
            Event::Chat(text) => self.chat.push(text),
            _ => {}
        }
    }
}

/// Drains events from all clients for `dur`.
async fn collect(clients: &mut [Client], seen: &mut [Seen], dur: Duration) {
    let end = Instant::now() + dur;
    while Instant::now() < end {
        for (c, s) in clients.iter_mut().zip(seen.iter_mut()) {
            while let Some(ev) = c.next_event_within(Duration::from_millis(1)).await {
                s.absorb(ev);
            }
        }
    }
}

/// Sends `n` packets of each kind from every client, paced like real media,
/// while draining everyone's events.
async fn publish(clients: &mut [Client], names: &[&str], seen: &mut [Seen], from_seq: u32) {
    let start = Instant::now();
    for i in 0..AUDIO_PACKETS {
        let seq = from_seq + i;
        for (c, name) in clients.iter().zip(names) {
            c.send_rtp(
                Kind::Audio,
                payload(Kind::Audio, name, seq),
                false,
                seq * 960,
            )
            .expect("send audio");
            if i < VIDEO_PACKETS {
                c.send_rtp(
                    Kind::Video,
                    payload(Kind::Video, name, seq),
                    true,
                    seq * 3000,
                )
                .expect("send video");
            }
        }
        let due = start + Duration::from_millis(20 * u64::from(i + 1));
        collect(clients, seen, due.saturating_duration_since(Instant::now())).await;
    }
    collect(clients, seen, Duration::from_millis(500)).await;
}

async fn three_peers_receive_each_others_audio_and_video_intact(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob", "carol"];
    let mut clients = Vec::new();
    for name in names {
        clients.push(join(&server, "sfu3", name).await);
    }
    for c in clients.iter_mut() {
        until_connected(c).await;
    }
    let ids: HashMap<String, &str> = clients
        .iter()
        .zip(names)
        .map(|(c, n)| (c.id.clone(), n))
        .collect();
    // A first round opens the tracks (the server learns of a track from its
    // first RTP packet, then offers it to the others).
    let mut first: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut first, 0).await;
    for (i, s) in first.iter().enumerate() {
        let expected: HashSet<(String, Kind)> = clients
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, c)| [(c.id.clone(), Kind::Audio), (c.id.clone(), Kind::Video)])
            .collect();
        assert_eq!(s.tracks, expected, "{}: one audio and one video track per other participant, stream id = their participant id", names[i]);
    }
    let mut seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 10_000).await;

    for (i, s) in seen.iter().enumerate() {
        let me = names[i];
        assert_eq!(s.corrupt, 0, "{me}: every payload arrives byte for byte");
        for (j, other) in names.iter().enumerate() {
            let audio = s.got(other, Kind::Audio, 10_000, AUDIO_PACKETS);
            let video = s.got(other, Kind::Video, 10_000, VIDEO_PACKETS);
            if i == j {
                assert_eq!(audio + video, 0, "{me} never receives itself");
                continue;
            }
            eprintln!(
                "{me} <- {other}: audio {audio}/{AUDIO_PACKETS}, video {video}/{VIDEO_PACKETS}"
            );
            assert!(
                audio as f64 >= 0.99 * f64::from(AUDIO_PACKETS),
                "{me} got {audio}/{AUDIO_PACKETS} audio packets from {other}"
            );
            assert!(
                video as f64 >= 0.99 * f64::from(VIDEO_PACKETS),
                "{me} got {video}/{VIDEO_PACKETS} video packets from {other}"
            );
        }
    }
    let _ = ids;
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_media_connections_by_state{state=\"connected\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "switchboard_rooms_by_participants{participants=\"3-4\"}"
        ),
        1.0
    );
    assert!(metric(&m, "switchboard_media_rtp_forwarded_total") > 0.0);
}

/// Sends one audio and one video packet with sequence `seq` from every client.
fn send_round(clients: &[Client], names: &[&str], seq: u32) {
    for (c, name) in clients.iter().zip(names) {
        let _ = c.send_rtp(
            Kind::Audio,
            payload(Kind::Audio, name, seq),
            false,
            seq * 960,
        );
        let _ = c.send_rtp(
            Kind::Video,
            payload(Kind::Video, name, seq),
            true,
            seq * 3000,
        );
    }
}

/// Collects until `cond(seen)` holds for every client, or `limit` passes.
async fn until(
    clients: &mut [Client],
    seen: &mut [Seen],
    limit: Duration,
    cond: impl Fn(usize, &Seen) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    loop {
        if seen.iter().enumerate().all(|(i, s)| cond(i, s)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        collect(clients, seen, Duration::from_millis(20)).await;
    }
}

async fn a_late_joiner_gets_everyone_promptly_and_a_leavers_tracks_end(workers: usize) {
    let server = media_server(workers).await;
    let mut names = vec!["alice", "bob", "carol"];
    let mut clients = Vec::new();
    for name in &names {
        clients.push(join(&server, "late", name).await);
    }
    for c in clients.iter_mut() {
        until_connected(c).await;
    }
    let mut seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 0).await;
    let plis_before = metric(&metrics(&server).await, "switchboard_media_plis_sent_total");

    // Dave joins a running call.
    let joined_at = Instant::now();
    clients.push(join(&server, "late", "dave").await);
    names.push("dave");
    seen.push(Seen::default());
    until_connected(&mut clients[3]).await;
    // Everyone keeps publishing; dave must get all three others, audio and video.
    let mut first_packet: HashMap<String, Duration> = HashMap::new();
    let end = Instant::now() + WAIT;
    let mut seq = 5_000;
    while first_packet.len() < 6 && Instant::now() < end {
        send_round(&clients, &names, seq);
        seq += 1;
        while let Some(ev) = clients[3]
            .next_event_within(Duration::from_millis(20))
            .await
        {
            if let Event::Rtp { kind, packet, .. } = &ev {
                if let Some((name, _)) = parse(*kind, &packet.payload) {
                    first_packet
                        .entry(format!("{name}/{kind:?}"))
                        .or_insert_with(|| joined_at.elapsed());
                }
            }
            seen[3].absorb(ev);
        }
        for (c, s) in clients[..3].iter_mut().zip(seen.iter_mut()) {
            while let Some(ev) = c.next_event_within(Duration::from_millis(1)).await {
                s.absorb(ev);
            }
        }
    }
    eprintln!("dave's join -> first packet per remote track: {first_packet:?}");
    assert_eq!(
        first_packet.len(),
        6,
        "dave receives audio and video of alice, bob and carol: {first_packet:?}"
    );
    assert_eq!(seen[3].tracks.len(), 6);
    let plis_after = metric(&metrics(&server).await, "switchboard_media_plis_sent_total");
    assert!(
        plis_after > plis_before,
        "dave's arrival asked the publishers for keyframes"
    );
    // The others get dave's tracks too (their offers may still be in
    // flight when dave already has everyone): keep media flowing, bounded.
    let dave = clients[3].id.clone();
    let end = Instant::now() + WAIT;
    while Instant::now() < end
        && !seen[..3]
            .iter()
            .all(|s| s.tracks.contains(&(dave.clone(), Kind::Video)))
    {
        send_round(&clients, &names, seq);
        seq += 1;
        collect(&mut clients, &mut seen, Duration::from_millis(20)).await;
    }
    for (i, s) in seen[..3].iter().enumerate() {
        assert!(
            s.tracks.contains(&(dave.clone(), Kind::Video)),
            "{} sees dave's video",
            names[i]
        );
    }

    // Chat: relayed to every other open channel, never back to the sender.
    clients[0].send_chat("hello everyone").expect("chat");
    let alice = clients[0].id.clone();
    let expected = serde_json::json!({"from": alice, "data": "hello everyone"});
    let got = until(&mut clients, &mut seen, WAIT, |i, s| {
        i == 0 || !s.chat.is_empty()
    })
    .await;
    assert!(got, "bob, carol and dave get alice's chat");
    for (i, s) in seen.iter().enumerate().skip(1) {
        let msg: serde_json::Value = serde_json::from_str(&s.chat[0]).expect("chat is JSON");
        assert_eq!(msg, expected, "{}", names[i]);
    }
    assert!(
        seen[0].chat.is_empty(),
        "the sender does not get its own message"
    );

    // Carol leaves: her two tracks end at alice, bob and dave.
    clients[2].leave();
    let removed = until(&mut clients, &mut seen, WAIT, |i, s| {
        i == 2 || s.removed >= 2
    })
    .await;
    assert!(
        removed,
        "carol's tracks end at the others: {:?}",
        seen.iter().map(|s| s.removed).collect::<Vec<_>>()
    );
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_media_connections"),
        3.0,
        "carol's server connection is freed"
    );
}

/// Joins `names` to `room` with `opts` tweaks and waits until all are connected.
async fn join_all(
    server: &RunningServer,
    room: &str,
    names: &[&str],
    tweak: impl Fn(&mut JoinOptions, usize),
) -> Vec<Client> {
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut opts = JoinOptions::sfu(&server.ws_url(), room, name);
        tweak(&mut opts, i);
        clients.push(Client::join(opts).await.expect("joins"));
    }
    for c in clients.iter_mut() {
        until_connected(c).await;
    }
    clients
}

async fn a_subscribers_nacks_are_answered_with_the_original_payload(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob", "carol"];
    // Bob's network loses every 7th RTP datagram the server sends him,
    // carol's every 5th (odd, so the loss hits both kinds: with an even
    // period and audio and video interleaved one for one, it could fall on
    // audio alone, and then no video is NACKed). Both subscribe to alice's
    // video: each one's NACKs must be answered, whatever the other lost.
    let mut clients = join_all(&server, "nack", &names, |o, i| match i {
        1 => o.drop_incoming_rtp_every = Some(7),
        2 => o.drop_incoming_rtp_every = Some(5),
        _ => {}
    })
    .await;
    let mut warmup: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut warmup, 0).await;
    let before = metrics(&server).await;
    let nacked_before = metric(&before, "switchboard_media_nacked_packets_received_total");
    let answered_before = metric(&before, ANSWERED);
    let mut seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 20_000).await;
    collect(&mut clients, &mut seen, Duration::from_secs(1)).await;
    for (i, every) in [(1, 7), (2, 5)] {
        let me = names[i];
        let video = seen[i].got("alice", Kind::Video, 20_000, VIDEO_PACKETS);
        let audio = seen[i].got("alice", Kind::Audio, 20_000, AUDIO_PACKETS);
        eprintln!("{me}, losing 1 in {every} datagrams, got video {video}/{VIDEO_PACKETS}, audio {audio}/{AUDIO_PACKETS}");
        assert_recovered(&seen[i], me, "alice");
    }
    let m = metrics(&server).await;
    let nacked = metric(&m, "switchboard_media_nacked_packets_received_total") - nacked_before;
    assert!(
        nacked >= 20.0,
        "bob's and carol's NACKs of the measured round reached the server: {nacked}"
    );
    // Both were answered from the one history of alice's video stream:
    // each subscriber's stream keeps only which of alice's packets it sent.
    let answered = metric(&m, ANSWERED) - answered_before;
    eprintln!(
        "NACKed {nacked}, answered from alice's stream history {answered}, not sent {}, over the limit {}",
        metric(&m, "switchboard_media_nack_answers_total{result=\"not-sent\"}"),
        m.lines().find(|l| l.contains("nack-over-limit")).unwrap_or("-")
    );
    assert!(
        answered >= 20.0,
        "the lost video packets of both were sent again from the history: {answered}"
    );
}

const ANSWERED: &str = "switchboard_media_nack_answers_total{result=\"sent\"}";

async fn a_publishers_uplink_loss_is_nacked_upstream_and_recovered(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob"];
    // Alice's uplink loses every 7th RTP datagram she sends (after her
    // sender kept it for retransmission); bob's link is clean.
    let mut clients = join_all(&server, "uplink", &names, |o, i| {
        if i == 0 {
            o.drop_outgoing_rtp_every = Some(7);
        }
    })
    .await;
    let mut warmup: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut warmup, 0).await;
    let before = metrics(&server).await;
    let sent_before = metric(&before, "switchboard_media_nacked_packets_sent_total");
    let mut seen: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 20_000).await;
    collect(&mut clients, &mut seen, Duration::from_secs(1)).await;
    let video = seen[1].got("alice", Kind::Video, 20_000, VIDEO_PACKETS);
    let audio = seen[1].got("alice", Kind::Audio, 20_000, AUDIO_PACKETS);
    let m = metrics(&server).await;
    let nacked = metric(&m, "switchboard_media_nacked_packets_sent_total") - sent_before;
    eprintln!(
        "alice losing 1 in 7 upstream: bob got video {video}/{VIDEO_PACKETS}, \
         audio {audio}/{AUDIO_PACKETS}; the server NACKed {nacked} packets upstream"
    );
    assert!(
        nacked >= 10.0,
        "the server NACKed alice's lost packets: {nacked}"
    );
    assert_recovered(&seen[1], "bob", "alice");
}

/// What a subscriber of `from` saw in the round from sequence 20,000 on a
/// lossy path: every payload intact, the video whole again (NACK repaired
/// it), and audio, which negotiates no NACK, short (the loss was real).
fn assert_recovered(seen: &Seen, me: &str, from: &str) {
    let video = seen.got(from, Kind::Video, 20_000, VIDEO_PACKETS);
    let audio = seen.got(from, Kind::Audio, 20_000, AUDIO_PACKETS);
    assert_eq!(
        seen.corrupt, 0,
        "{me}: retransmissions carry the original payload"
    );
    assert!(
        video as f64 >= 0.99 * f64::from(VIDEO_PACKETS),
        "{me} got {from}'s lost video back through NACK: {video}/{VIDEO_PACKETS}"
    );
    assert!(
        audio < AUDIO_PACKETS as usize,
        "{me}: the loss was real: audio {audio}/{AUDIO_PACKETS}"
    );
}

async fn a_warm_standby_connection_carries_no_media_until_the_room_is_sfu(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob"];
    // An auto room: p2p for two; both open their server connection anyway.
    let mut clients = join_all(&server, "standby", &names, |o, _| {
        o.mode = None;
        o.standby = true;
    })
    .await;
    assert_eq!(clients[0].joined.mode, switchboard_proto::MediaMode::P2p);
    let mut seen: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 0).await;
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_media_rtp_forwarded_total"),
        0.0,
        "nothing forwarded in p2p"
    );
    assert!(metric(&m, "switchboard_media_dropped_total{reason=\"standby\"}") > 0.0);
    assert!(seen
        .iter()
        .all(|s| s.packets.is_empty() && s.tracks.is_empty()));

    // P2P fails: the room goes sfu and the standby connections start carrying media.
    let bob = clients[1].id.clone();
    clients[0]
        .send_signal(switchboard_proto::ClientMessage::P2pFailed(
            switchboard_proto::P2pFailed {
                room: switchboard_proto::RoomName::parse("standby").expect("room"),
                peer: bob,
            },
        ))
        .expect("send");
    let switched_at = Instant::now();
    let mut seq = 1_000;
    let end = Instant::now() + WAIT;
    let mut first: Option<Duration> = None;
    while Instant::now() < end && seen.iter().any(|s| s.packets.len() < 2) {
        send_round(&clients, &names, seq);
        seq += 1;
        collect(&mut clients, &mut seen, Duration::from_millis(20)).await;
        if first.is_none() && seen.iter().any(|s| !s.packets.is_empty()) {
            first = Some(switched_at.elapsed());
        }
    }
    eprintln!("p2p-failed -> first server-relayed packet with a warm standby: {first:?}");
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(
            s.packets.len(),
            2,
            "{} gets the other's audio and video after the switch",
            names[i]
        );
    }
}

async fn garbage_on_the_media_port_is_dropped_counted_and_harms_nobody(workers: usize) {
    let server = media_server(workers).await;
    let media = server.media_addr().expect("media plane runs");
    let names = ["alice", "bob"];
    let mut clients = join_all(&server, "garbage", &names, |_, _| {}).await;
    let mut warmup: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut warmup, 0).await;

    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut stun_unknown = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun_unknown.extend_from_slice(&[7u8; 12]); // transaction id
    stun_unknown.extend_from_slice(&[0x00, 0x06, 0x00, 0x07]); // USERNAME, 7 bytes
    stun_unknown.extend_from_slice(b"nobody:\0"); // padded to 8
    let mut rtp_from_stranger = vec![0x80, 96, 0, 1, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
    rtp_from_stranger.extend_from_slice(&[0u8; 100]);
    let garbage: Vec<Vec<u8>> = vec![
        vec![],                                   // empty
        vec![0xff; 40],                           // not STUN, DTLS or RTP
        vec![0x80, 0x60, 0x00],                   // truncated RTP
        vec![0x16, 0xfe],                         // truncated DTLS
        vec![0x80; 4000],                         // oversized
        vec![0x00, 0x01, 0x00, 0xff, 0x21, 0x12], // truncated STUN
        stun_unknown,
        rtp_from_stranger,
    ];
    // Bounded: 8 kinds x 50, interleaved with real media.
    let mut seen: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    for round in 0..50u32 {
        for g in &garbage {
            let _ = attacker.send_to(g, media).await;
        }
        for (c, name) in clients.iter().zip(&names) {
            let seq = 30_000 + round;
            c.send_rtp(
                Kind::Audio,
                payload(Kind::Audio, name, seq),
                false,
                seq * 960,
            )
            .expect("send");
        }
        collect(&mut clients, &mut seen, Duration::from_millis(20)).await;
    }
    collect(&mut clients, &mut seen, Duration::from_millis(500)).await;
    for (i, s) in seen.iter().enumerate() {
        let other = names[1 - i];
        let got = s.got(other, Kind::Audio, 30_000, 50);
        assert!(
            got >= 49,
            "{} still gets {other}'s audio: {got}/50",
            names[i]
        );
        assert_eq!(s.corrupt, 0);
    }
    let m = metrics(&server).await;
    let dropped: f64 = m
        .lines()
        .filter(|l| l.starts_with("switchboard_media_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        dropped >= 50.0 * 7.0,
        "garbage is counted as dropped: {dropped}\n{m}"
    );
    for reason in ["unknown-ufrag", "unknown-address", "oversize"] {
        assert!(
            m.lines()
                .any(|l| l.contains(&format!("reason=\"{reason}\"")) && !l.ends_with(" 0")),
            "no drops counted as {reason}:\n{m}"
        );
    }
    assert_eq!(metric(&m, "switchboard_media_connections"), 2.0);
}

async fn a_vanished_peer_is_removed_and_its_tracks_end_at_the_others(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob", "carol"];
    let mut clients = join_all(&server, "vanish", &names, |_, _| {}).await;
    let mut seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 0).await;
    assert!(seen[0].tracks.len() == 4 && seen[1].tracks.len() == 4);
    // Carol's network disappears; her signaling stays up.
    clients[2].freeze_media();
    let frozen_at = Instant::now();
    let removed = until(&mut clients, &mut seen, Duration::from_secs(20), |i, s| {
        i == 2 || s.removed >= 2
    })
    .await;
    let took = frozen_at.elapsed();
    eprintln!("vanished peer detected and its tracks removed after {took:?}");
    assert!(removed, "alice and bob see carol's tracks end");
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_media_connections"),
        2.0,
        "carol's connection is freed"
    );
}

async fn ice_tcp_carries_media_for_a_client_that_cannot_use_udp(workers: usize) {
    let server = media_server(workers).await;
    let names = ["alice", "bob"];
    // Alice offers only an active TCP candidate (no UDP at all), so her
    // connection can only work over the server's passive ICE-TCP candidate
    // on the media port number.
    let mut clients = join_all(&server, "tcp", &names, |o, i| o.ice_tcp = i == 0).await;
    let mut warmup: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut warmup, 0).await;
    let mut seen: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 40_000).await;
    for (i, s) in seen.iter().enumerate() {
        let other = names[1 - i];
        let audio = s.got(other, Kind::Audio, 40_000, AUDIO_PACKETS);
        let video = s.got(other, Kind::Video, 40_000, VIDEO_PACKETS);
        eprintln!(
            "{} <- {other} (alice on ICE-TCP): audio {audio}, video {video}",
            names[i]
        );
        assert!(
            audio as f64 >= 0.99 * f64::from(AUDIO_PACKETS),
            "{}: audio {audio}",
            names[i]
        );
        assert!(
            video as f64 >= 0.99 * f64::from(VIDEO_PACKETS),
            "{}: video {video}",
            names[i]
        );
        assert_eq!(s.corrupt, 0);
    }
    let m = metrics(&server).await;
    let tcp = metric(&m, "switchboard_media_tcp_packets_received_total");
    assert!(
        tcp >= f64::from(AUDIO_PACKETS + VIDEO_PACKETS),
        "alice's media came over TCP: {tcp}"
    );
}

/// Publishers come and go while one subscriber stays: each newcomer's
/// tracks reuse the m-sections of the ones who left (after the exchange
/// that made them inactive), so the subscriber's SDP stops growing, and it
/// still receives every newcomer's audio and video.
async fn a_subscribers_media_sections_are_reused_as_publishers_come_and_go(workers: usize) {
    let server = media_server(workers).await;
    let room = "churn";
    let audio_forward = |o: &mut JoinOptions| {
        o.audio = Some(switchboard_proto::AudioMode::Forward);
    };
    let mut opts = JoinOptions::sfu(&server.ws_url(), room, "carol");
    audio_forward(&mut opts);
    opts.publish_audio = false;
    opts.publish_video = false;
    let mut carol = Client::join(opts).await.expect("carol joins");
    until_connected(&mut carol).await;
    let mut sections = Vec::new();
    for round in 0..4u32 {
        let name = ["p0", "p1", "p2", "p3"][round as usize];
        let mut opts = JoinOptions::sfu(&server.ws_url(), room, name);
        audio_forward(&mut opts);
        let mut p = Client::join(opts).await.expect("publisher joins");
        until_connected(&mut p).await;
        // Carol gets both of this publisher's tracks.
        let mut got = HashSet::new();
        let end = Instant::now() + WAIT;
        let mut seq = round * 10_000;
        while got.len() < 2 && Instant::now() < end {
            let _ = p.send_rtp(
                Kind::Audio,
                payload(Kind::Audio, name, seq),
                false,
                seq * 960,
            );
            let _ = p.send_rtp(
                Kind::Video,
                payload(Kind::Video, name, seq),
                true,
                seq * 3000,
            );
            seq += 1;
            while let Some(ev) = carol.next_event_within(Duration::from_millis(20)).await {
                if let Event::Rtp { kind, packet, .. } = &ev {
                    if parse(*kind, &packet.payload).is_some_and(|(n, _)| n == name) {
                        got.insert(*kind);
                    }
                }
            }
            while p
                .next_event_within(Duration::from_millis(1))
                .await
                .is_some()
            {}
        }
        assert_eq!(
            got.len(),
            2,
            "round {round}: carol receives {name}'s audio and video"
        );
        sections.push(carol.server_sections());
        // It leaves; carol's two tracks of it end.
        p.leave();
        let mut removed = 0;
        let end = Instant::now() + WAIT;
        while removed < 2 && Instant::now() < end {
            if let Some(Event::TrackRemoved { .. }) =
                carol.next_event_within(Duration::from_millis(50)).await
            {
                removed += 1;
            }
        }
        assert_eq!(removed, 2, "round {round}: {name}'s tracks end at carol");
    }
    eprintln!("media sections in carol's server offers per round: {sections:?}");
    assert!(sections[0] >= 2, "{sections:?}");
    assert!(
        sections.iter().all(|n| *n == sections[0]),
        "later publishers reuse the sections of earlier ones: {sections:?}"
    );
}

/// Four rooms on a server with two media workers: the rooms are spread two
/// and two, each room's media reaches exactly its own members, each
/// worker handled at least the packets its two rooms sent, and worker 1
/// read them itself, on sockets connected to its peers, not handed over
/// by worker 0 (which reads the port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_two_workers_and_each_carries_its_own() {
    let server = media_server(2).await;
    let names: Vec<String> = (0..4)
        .flat_map(|r| [format!("r{r}a"), format!("r{r}b")])
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        clients.push(join(&server, &format!("spread{}", i / 2), name).await);
    }
    for c in clients.iter_mut() {
        until_connected(c).await;
    }
    let mut first: Vec<Seen> = names.iter().map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut first, 0).await;
    let before = metrics(&server).await;
    let mut seen: Vec<Seen> = names.iter().map(|_| Seen::default()).collect();
    publish(&mut clients, &names, &mut seen, 10_000).await;
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.corrupt, 0, "{}: payloads intact", names[i]);
        for (j, other) in names.iter().enumerate() {
            let audio = s.got(other, Kind::Audio, 10_000, AUDIO_PACKETS);
            let video = s.got(other, Kind::Video, 10_000, VIDEO_PACKETS);
            if i / 2 != j / 2 || i == j {
                assert_eq!(audio + video, 0, "{} must not receive {other}", names[i]);
                continue;
            }
            eprintln!("{} <- {other}: audio {audio}, video {video}", names[i]);
            assert!(f64::from(audio as u32) >= 0.99 * f64::from(AUDIO_PACKETS));
            assert!(f64::from(video as u32) >= 0.99 * f64::from(VIDEO_PACKETS));
        }
    }
    let after = metrics(&server).await;
    let per_worker = |w: usize| {
        let sample = format!("switchboard_media_worker_datagrams_total{{worker=\"{w}\"}}");
        metric(&after, &sample) - metric(&before, &sample)
    };
    // Two rooms, two publishers each, one round of audio and video.
    let sent_by_two_rooms = 4.0 * f64::from(AUDIO_PACKETS + VIDEO_PACKETS);
    for w in 0..2 {
        let handled = per_worker(w);
        eprintln!("worker {w}: {handled} datagrams in the measured round");
        assert!(
            handled >= 0.99 * sent_by_two_rooms,
            "worker {w} handled {handled} datagrams, its rooms sent {sent_by_two_rooms}"
        );
        let rooms = format!("switchboard_media_worker_rooms{{worker=\"{w}\"}}");
        assert_eq!(metric(&after, &rooms), 2.0, "worker {w} holds two rooms");
    }
    // Worker 1 read its peers' media on their direct sockets: worker 0
    // handed over next to nothing of it.
    let handed = metric(&after, "switchboard_media_handed_over_total")
        - metric(&before, "switchboard_media_handed_over_total");
    eprintln!("handed over by worker 0 in the measured round: {handed}");
    assert!(
        handed <= 0.01 * per_worker(1),
        "worker 0 handed over {handed} of worker 1's {} datagrams",
        per_worker(1)
    );
    assert_eq!(
        metric(&after, "switchboard_media_direct_sockets"),
        4.0,
        "one direct socket per peer of worker 1"
    );
}

/// Runs each test with one media worker and with two.
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {
        mod one_worker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(1).await
                }
            )*
        }
        mod two_workers {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(2).await
                }
            )*
        }
    };
}

both_ways!(
    three_peers_receive_each_others_audio_and_video_intact,
    a_late_joiner_gets_everyone_promptly_and_a_leavers_tracks_end,
    a_subscribers_nacks_are_answered_with_the_original_payload,
    a_publishers_uplink_loss_is_nacked_upstream_and_recovered,
    a_warm_standby_connection_carries_no_media_until_the_room_is_sfu,
    garbage_on_the_media_port_is_dropped_counted_and_harms_nobody,
    a_vanished_peer_is_removed_and_its_tracks_end_at_the_others,
    ice_tcp_carries_media_for_a_client_that_cannot_use_udp,
    a_subscribers_media_sections_are_reused_as_publishers_come_and_go
);
