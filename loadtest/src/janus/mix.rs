//! `--audio-mode mix`: the load against Janus AudioBridge.
//!
//! Every participant joins an AudioBridge room and `configure`s one
//! PeerConnection with our offer (one sendrecv Opus track): it sends audio
//! (publishers, unmuted) and gets back one stream, the mix of everyone else.
//! The audio is what `run --audio` sends Switchboard's mixer
//! ([`crate::publish`]): the Opus tone, stamped in the packet's padding
//! (decoders ignore padding, so AudioBridge decodes it like any Opus).
//!
//! A mix carries no stamp of ours, so there is no end-to-end latency here.
//! Each subscriber counts the mixed stream from the window start on by RTP
//! header ([`crate::rxstats::RtpStats`]: loss by sequence number, jitter),
//! exactly as `run` counts Switchboard's mixed track. The server's CPU is
//! reported per delivered mixed packet and per participant.

use std::time::Instant;

use serde_json::json;
use switchboard_client::Kind;

use super::api::Session;
use super::peer::Peer;
use super::{jsep_sdp, until_connected, until_webrtcup, Outcome, Shared};

/// Session, AudioBridge handle, `join` (muted unless publishing),
/// `configure` with our offer, PeerConnection connected and `webrtcup`.
pub async fn join(
    shared: &Shared,
    out: &mut Outcome,
    session: &mut Session,
) -> Result<Peer, String> {
    let deadline: tokio::time::Instant = (Instant::now() + shared.join_timeout).into();
    let room = shared.room_ids[out.room];
    let handle = session
        .attach("janus.plugin.audiobridge")
        .await
        .map_err(|e| e.to_string())?;
    let display = format!("{}-{}", shared.run_id, out.name);
    let muted = !out.publishes;
    let (joined, _) = session
        .message(
            handle,
            json!({"request": "join", "room": room, "display": display, "muted": muted}),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    out.feed = joined["id"].as_u64();
    if joined["audiobridge"] != "joined" || out.feed.is_none() {
        return Err(format!("join: unexpected answer {joined}"));
    }
    let mut peer = Peer::start(shared.bind, &[Kind::Audio], &out.name)
        .await
        .map_err(|e| format!("PeerConnection: {e}"))?;
    let offer = peer.offer().await.map_err(|e| format!("offer: {e}"))?;
    let (_, jsep) = session
        .message(
            handle,
            json!({"request": "configure", "muted": muted}),
            Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
        )
        .await
        .map_err(|e| e.to_string())?;
    session.trickle_completed(handle);
    let answer = jsep_sdp(jsep, "answer", "configure")?;
    peer.answer(answer)
        .await
        .map_err(|e| format!("Janus's answer: {e}"))?;
    until_connected(&mut peer, deadline, "PeerConnection", out).await?;
    until_webrtcup(session, handle, deadline).await?;
    Ok(peer)
}
