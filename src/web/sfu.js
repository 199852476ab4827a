// The one connection to the server's peer "sfu" in SFU rooms (and the
// warm standby during P2P calls): signaling, and whose tracks arrive on it.

import { MIX, S, SFU } from './state.js';
import { clearNotice, notice } from './notices.js';
import {
  attachRemote,
  playMedia,
  refreshTile,
  updateModeBadge,
  updatePeerState,
  watchTrack,
} from './view.js';
import { signal } from './protocol.js';
import { addCandidate, addPeer } from './p2p.js';
import { setServerReach, stopServerReachWatch, watchServerReach } from './switch.js';
import { updateChatState, updateChatVisibility, wireChat } from './chat.js';
import { dropSocket, probeSocket, send } from './socket.js';
import { addSfuTracks, stopTrackSettings, syncTrackSettings } from './layers.js';

const RESTART_AFTER_MS = 1000; // `disconnected` this long: ICE restart
// Nothing at all received on the server connection this long, after
// others' media was flowing through it (RTP, RTCP and consent answers all
// stopped at once), and the signaling socket silent too: the path broke (an
// address change). Chromium calls it `disconnected` only after ~5 s; this
// sees it sooner.
const STALL_MS = 1200;
const STALL_PROBE_MS = 400;
const WATCH_MS = 250;

export function openSfu() {
  let pc;
  try {
    pc = new RTCPeerConnection({ iceServers: S.iceServers, bundlePolicy: 'max-bundle' });
  } catch (e) {
    notice('ice', 'error', `The server's ICE settings were rejected (${e.message}); trying without them.`);
    pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  }
  const sfu = {
    pc,
    chain: Promise.resolve(), // signaling steps, one at a time
    pending: [], // remote candidates that came before the remote description
    outbox: [], // our candidates gathered before the offer went out
    offerSent: false,
    needsOffer: false, // our offer was rolled back: offer again when stable
    owners: new Map(), // mid -> stream id (= publishing participant, or "mix")
    remote: new Map(), // mid -> { owner, kind, track } of what we receive now
    chat: null,
    syncQueued: false,
    restartTimer: null,
    iceRestarts: 0, // ICE restarts this connection made
    // What arrived on the connection's transport, and since when nothing.
    // `armed`: RTP arrived since the last stall (a quiet connection, e.g.
    // the standby or one whose senders went quiet, is not a broken one).
    watch: { rx: -1, rtp: -1, at: Date.now(), armed: false, stalled: false, timer: null },
    pathStalls: 0, // times the path was seen broken before ICE said so
    video: null, // { transceiver, sender, layers } of our camera (see addSfuTracks)
    layersChain: null, // `publisher-layers` changes, one at a time
  };
  S.sfu = sfu;
  // The camera in simulcast when the server takes it (see layers.js).
  addSfuTracks(sfu);
  // In-band, ordered, reliable: the server relays it to everyone else's `chat`.
  sfu.chat = pc.createDataChannel('chat', { ordered: true });
  wireChat(sfu, sfu.chat);

  pc.onicecandidate = ({ candidate }) => {
    let data;
    if (candidate && candidate.candidate) {
      data = { type: 'candidate', label: candidate.sdpMLineIndex, id: candidate.sdpMid, candidate: candidate.candidate };
    } else if (!candidate) {
      // End of candidates, once for the whole BUNDLE transport.
      const first = pc.getTransceivers().find((t) => t.mid !== null);
      data = { type: 'candidate', label: 0, id: first ? first.mid : '0', candidate: '' };
    } else {
      return;
    }
    if (sfu.offerSent) signal(SFU, data); else sfu.outbox.push(data);
  };
  pc.ontrack = (ev) => {
    const owner = ev.streams[0] ? ev.streams[0].id : null;
    if (ev.transceiver.mid && owner) sfu.owners.set(ev.transceiver.mid, owner);
    watchTrack(ev.track, () => queueSfuSync(sfu));
    queueSfuSync(sfu);
  };
  // ICE restart when the path breaks (the network changed: new address,
  // new candidates): after RESTART_AFTER_MS of `disconnected`, or at once on
  // `failed`, offer again with new credentials; the server answers with
  // its own. Signaling is checked first (it may have died with the network).
  pc.oniceconnectionstatechange = () => {
    if (S.sfu !== sfu) return;
    const state = pc.iceConnectionState;
    clearTimeout(sfu.restartTimer);
    if (state === 'disconnected' || state === 'failed') {
      probeSocket();
      sfu.restartTimer = setTimeout(() => restartSfuIce(sfu), state === 'failed' ? 0 : RESTART_AFTER_MS);
    }
  };
  pc.onconnectionstatechange = () => {
    if (S.sfu !== sfu) return;
    const state = pc.connectionState;
    updateModeBadge();
    updateChatState();
    for (const peer of S.peers.values()) updatePeerState(peer);
    if (S.mode === 'p2p') {
      // Warm standby: its state is only the server's reachability.
      if (state === 'connected') { stopServerReachWatch(); setServerReach('reachable'); }
      else if (state === 'failed') { stopServerReachWatch(); setServerReach('unreachable'); }
      return;
    }
    if (state === 'connected') clearNotice('sfu-conn');
    else if (state === 'failed') {
      notice('sfu-conn', 'error', 'The media connection to the server failed. Leave and join again to retry.');
    } else if (state === 'disconnected') {
      notice('sfu-conn', 'info', 'The media connection to the server is interrupted\u2026', { sticky: true });
    }
  };
  updateModeBadge();
  updateChatState();
  updateChatVisibility();
  if (S.mode === 'p2p') watchServerReach();
  sfu.watch.timer = setInterval(() => { checkPath(sfu); }, WATCH_MS);
  // The client always offers first, even with nothing to send but `chat`.
  sfuStep(sfu, () => sfuOffer(sfu));
}

// Whether the server connection's path is broken though ICE still says
// `connected`: others' media was coming through it, then the bytes received
// on its transport stopped for STALL_MS. Then signaling is asked (a ping,
// STALL_PROBE_MS): silent too, it died with the same network, so it
// reconnects (and resumes) at once and `resumed` restarts ICE; answered,
// the network is fine and the senders merely went quiet.
async function checkPath(sfu) {
  if (S.sfu !== sfu) { clearInterval(sfu.watch.timer); return; }
  const pc = sfu.pc;
  const w = sfu.watch;
  if (S.mode !== 'sfu' || !['connected', 'completed'].includes(pc.iceConnectionState)) {
    w.at = Date.now();
    w.armed = false;
    return;
  }
  let rx = 0;
  let rtp = 0;
  try {
    (await pc.getStats()).forEach((st) => {
      if (st.type === 'transport') rx += st.bytesReceived || 0;
      else if (st.type === 'inbound-rtp') rtp += st.packetsReceived || 0;
    });
  } catch (_) {
    return;
  }
  const now = Date.now();
  if (rtp !== w.rtp) {
    if (w.rtp >= 0 && rtp > w.rtp) w.armed = true;
    w.rtp = rtp;
  }
  if (rx !== w.rx) {
    w.rx = rx;
    w.at = now;
    w.stalled = false;
    return;
  }
  if (!w.armed || w.stalled || now - w.at < STALL_MS) return;
  w.stalled = true;
  w.armed = false;
  const quietMs = now - w.at;
  const dead = await socketSilent(STALL_PROBE_MS);
  if (S.sfu !== sfu || !dead) return;
  sfu.pathStalls += 1;
  console.info(`server connection: nothing received for ${quietMs} ms, signaling silent; reconnecting and restarting its path`);
  if (S.ws && S.ws.readyState === WebSocket.OPEN) dropSocket(); else restartSfuIce(sfu);
}

// Whether the signaling socket leaves a ping unanswered for `ms`.
function socketSilent(ms) {
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return Promise.resolve(true);
  const sent = Date.now();
  send({ type: 'ping', id: ++S.pingSeq });
  return new Promise((resolve) => setTimeout(() => resolve(S.lastPong < sent), ms));
}

// ICE restart on the server connection, if its path is still broken. With
// signaling down (or being checked) it waits: `resumed` calls it again.
export function restartSfuIce(sfu = S.sfu) {
  if (!sfu || S.sfu !== sfu) return;
  const pc = sfu.pc;
  if (!['disconnected', 'failed'].includes(pc.iceConnectionState) && !sfu.watch.stalled) return;
  if (S.phase !== 'in-room' || !S.ws || S.ws.readyState !== WebSocket.OPEN) return;
  if (pc.signalingState === 'have-local-offer') {
    // An offer (maybe the restart's) went into a socket that died: again.
    signal(SFU, { type: 'offer', sdp: pc.localDescription.sdp });
    return;
  }
  sfu.iceRestarts += 1;
  pc.restartIce();
  sfuStep(sfu, () => sfuOffer(sfu));
}

// Runs one signaling step after the previous ones.
export function sfuStep(sfu, step) {
  sfu.chain = sfu.chain.then(() => (S.sfu === sfu && sfu.pc.signalingState !== 'closed' ? step() : undefined))
    .catch((e) => {
      console.warn('server connection signaling failed:', e);
      if (S.sfu === sfu) notice('sfu-conn', 'error', `Connecting to the server failed: ${e.message || e}`);
    });
}

export async function sfuOffer(sfu) {
  const pc = sfu.pc;
  if (pc.signalingState !== 'stable') { sfu.needsOffer = true; return; }
  sfu.needsOffer = false;
  await pc.setLocalDescription(await pc.createOffer());
  signal(SFU, { type: 'offer', sdp: pc.localDescription.sdp });
  if (!sfu.offerSent) {
    sfu.offerSent = true;
    for (const c of sfu.outbox.splice(0)) signal(SFU, c);
  }
}

export function onSfuSignal(data) {
  const sfu = S.sfu;
  if (!sfu) return;
  sfuStep(sfu, async () => {
    const pc = sfu.pc;
    switch (data.type) {
      case 'answer': {
        if (typeof data.sdp !== 'string' || pc.signalingState !== 'have-local-offer') return;
        await pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
        await flushSfuCandidates(sfu);
        break;
      }
      case 'offer': {
        if (typeof data.sdp !== 'string') return;
        // We are the polite peer: our crossing offer yields (the server drops it).
        if (pc.signalingState === 'have-local-offer') {
          await pc.setLocalDescription({ type: 'rollback' });
          sfu.needsOffer = true;
        }
        await pc.setRemoteDescription({ type: 'offer', sdp: data.sdp });
        await flushSfuCandidates(sfu);
        await pc.setLocalDescription(await pc.createAnswer());
        signal(SFU, { type: 'answer', sdp: pc.localDescription.sdp });
        break;
      }
      case 'candidate': {
        if (!pc.remoteDescription) { sfu.pending.push(data); return; }
        await addCandidate(pc, data);
        return;
      }
      default:
        return;
    }
    syncSfuTracks(sfu);
    if (sfu.needsOffer && pc.signalingState === 'stable') await sfuOffer(sfu);
  });
}

export async function flushSfuCandidates(sfu) {
  for (const c of sfu.pending.splice(0)) await addCandidate(sfu.pc, c);
}

export function queueSfuSync(sfu) {
  if (sfu.syncQueued) return;
  sfu.syncQueued = true;
  queueMicrotask(() => { sfu.syncQueued = false; syncSfuTracks(sfu); });
}

// mid -> { owner, ssrcs } of every m-section in `sdp` that names a stream
// (a=msid, or the older a=ssrc:N msid:), with the SSRCs it announces.
export function sdpStreams(sdp) {
  const out = new Map();
  if (typeof sdp !== 'string') return out;
  for (const section of sdp.split(/\r?\nm=/).slice(1)) {
    const mid = /^a=mid:(\S+)/m.exec(section);
    const msid = /^a=msid:(\S+)/m.exec(section) || /^a=ssrc:\d+ msid:(\S+)/m.exec(section);
    if (!mid || !msid || msid[1] === '-') continue;
    const ssrcs = new Set([...section.matchAll(/^a=ssrc:(\d+) /gm)].map((m) => Number(m[1])));
    out.set(mid[1], { owner: msid[1], ssrcs });
  }
  return out;
}

// Works out, by mid, which tracks the server sends us now and who each
// belongs to, and puts them in the tiles: a participant's audio and video
// share its tile; the mixed audio plays on its own.
export function syncSfuTracks(sfu) {
  if (S.sfu !== sfu) return;
  const pc = sfu.pc;
  const fromSdp = sdpStreams(pc.remoteDescription && pc.remoteDescription.sdp);
  sfu.remote.clear();
  for (const t of pc.getTransceivers()) {
    if (!t.mid || t.stopped) continue;
    // A forwarded track is one the server sends; `a=inactive` (or gone) means it ended.
    const receiving = t.currentDirection === 'recvonly' || t.currentDirection === 'sendrecv';
    const track = t.receiver.track;
    if (!receiving || track.readyState !== 'live') continue;
    const signalled = fromSdp.get(t.mid);
    const owner = signalled ? signalled.owner : sfu.owners.get(t.mid);
    if (!owner) continue;
    watchTrack(track, () => queueSfuSync(sfu));
    sfu.remote.set(t.mid, { owner, kind: track.kind, track, ssrcs: signalled ? signalled.ssrcs : new Set() });
  }
  const byOwner = new Map();
  for (const r of sfu.remote.values()) {
    if (!byOwner.has(r.owner)) byOwner.set(r.owner, []);
    byOwner.get(r.owner).push(r.track);
  }
  setMixAudio(byOwner.get(MIX) || []);
  byOwner.delete(MIX);
  // Media of someone we were not told about (yet): give it a tile; the
  // otherjoin names it. Nobody who said bye comes back.
  for (const owner of byOwner.keys()) {
    if (!S.peers.has(owner) && owner !== S.id && !S.gone.has(owner)) {
      addPeer(owner, S.names.get(owner) || '', { polite: true });
    }
  }
  for (const peer of S.peers.values()) setPeerMedia(peer, byOwner.get(peer.id) || []);
  syncTrackSettings(sfu);
}

export function setPeerMedia(peer, tracks) {
  const current = peer.sfuStream ? peer.sfuStream.getTracks() : [];
  const same = current.length === tracks.length && tracks.every((t) => current.includes(t));
  // While a direct connection still carries this participant (the switch
  // to the server is under way, see armSwitch), its media stays on screen.
  const direct = !!peer.pc && peer.pc.connectionState === 'connected';
  if (!same) {
    if (tracks.length) {
      // A fresh stream per change: every browser picks that up, not all notice addtrack.
      peer.sfuStream = new MediaStream(tracks);
      if (!direct) attachRemote(peer, peer.sfuStream);
    } else {
      peer.sfuStream = null;
      if (!direct) peer.tile.querySelector('video').srcObject = null;
    }
  }
  refreshTile(peer);
}

export function setMixAudio(tracks) {
  if (!tracks.length) {
    if (S.mixAudio) { S.mixAudio.srcObject = null; S.mixAudio.remove(); S.mixAudio = null; }
    return;
  }
  if (!S.mixAudio) {
    S.mixAudio = document.createElement('audio');
    S.mixAudio.autoplay = true;
    S.mixAudio.hidden = true;
    document.body.append(S.mixAudio);
  }
  const current = S.mixAudio.srcObject ? S.mixAudio.srcObject.getTracks() : [];
  if (current.length === tracks.length && tracks.every((t) => current.includes(t))) return;
  S.mixAudio.srcObject = new MediaStream(tracks);
  playMedia(S.mixAudio, () => {
    notice('autoplay', 'info', 'Click anywhere on the page to hear the others.', { sticky: true });
    document.addEventListener('click', () => {
      clearNotice('autoplay');
      if (S.mixAudio) { S.mixAudio.muted = false; S.mixAudio.play().catch(() => {}); }
    }, { once: true });
  });
}

export function closeSfu() {
  const sfu = S.sfu;
  if (!sfu) return;
  S.sfu = null;
  stopTrackSettings();
  clearTimeout(sfu.restartTimer);
  clearInterval(sfu.watch.timer);
  sfu.pc.oniceconnectionstatechange = null;
  sfu.pc.onicecandidate = null;
  sfu.pc.ontrack = null;
  sfu.pc.onconnectionstatechange = null;
  if (sfu.chat) { sfu.chat.onopen = null; sfu.chat.onclose = null; sfu.chat.onmessage = null; }
  sfu.pc.close();
  stopServerReachWatch();
  setMixAudio([]);
  for (const peer of S.peers.values()) {
    if (peer.sfuStream) setPeerMedia(peer, []);
  }
  clearNotice('sfu-conn');
  updateModeBadge();
  updateChatState();
  updateChatVisibility();
}
