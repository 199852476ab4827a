// Direct (P2P) calls: one RTCPeerConnection per remote participant, with
// its deadline before `p2p-failed`.

import { S } from './state.js';
import { clearNotice, notice } from './notices.js';
import {
  attachRemote,
  initial,
  makeTile,
  refreshTile,
  updateLayout,
  updatePeerState,
  watchTrack,
} from './view.js';
import { send } from './socket.js';
import { signal } from './protocol.js';
import { newPeerTiming } from './testhooks.js';
import { forgetVideo } from './layers.js';

export function addPeer(id, name, { polite }) {
  name = typeof name === 'string' ? name : '';
  const peer = {
    id, name, polite,
    pc: null, pending: [], chain: Promise.resolve(), stream: null,
    p2pTimer: null, reportedFailed: false, tile: makeTile(id, name),
    sfuStream: null, // MediaStream of this participant's tracks from the server connection
  };
  if (name || !S.names.has(id)) S.names.set(id, name);
  S.peers.set(id, peer);
  if (S.timing) S.timing.peers.set(id, newPeerTiming());
  if (S.mode !== 'sfu') startP2p(peer);
  updatePeerState(peer);
  updateLayout();
  return peer;
}

// The direct connection, with its deadline: `p2pTimeoutMs` from now to
// reach `connected`, else `p2p-failed` (browsers alone take 20-30 s).
export function startP2p(peer) {
  peer.reportedFailed = false;
  peer.pc = createPc(peer);
  peer.p2pTimer = setTimeout(() => {
    if (peer.pc && peer.pc.connectionState !== 'connected') reportP2pFailed(peer);
  }, S.p2pTimeoutMs);
}

export function removePeer(id) {
  const peer = S.peers.get(id);
  if (!peer) return;
  S.peers.delete(id);
  clearTimeout(peer.switchTimer);
  closePeerPc(peer);
  peer.sfuStream = null;
  forgetVideo(peer.tile.querySelector('video'));
  peer.tile.remove();
  clearNotice(`peer-${id}`);
  updateLayout();
}

export function closeAllPeers() {
  for (const id of [...S.peers.keys()]) removePeer(id);
}

// Ends the direct connection to `peer` (the tile stays).
export function closePeerPc(peer) {
  clearTimeout(peer.p2pTimer);
  peer.p2pTimer = null;
  peer.pending = [];
  const pc = peer.pc;
  if (!pc) return;
  peer.pc = null;
  pc.onconnectionstatechange = null;
  pc.onicecandidate = null;
  pc.ontrack = null;
  pc.close();
  peer.stream = null;
  const video = peer.tile.querySelector('video');
  if (!peer.sfuStream && video.srcObject) video.srcObject = null;
  clearNotice(`peer-${peer.id}`);
  refreshTile(peer);
}

export function setPeerName(peer, name) {
  if (typeof name !== 'string' || !name) return;
  peer.name = name;
  S.names.set(peer.id, name);
  peer.tile.querySelector('.name').textContent = name;
  peer.tile.querySelector('.avatar').textContent = initial(name);
}

export function createPc(peer) {
  let pc;
  try {
    pc = new RTCPeerConnection({ iceServers: S.iceServers, bundlePolicy: 'max-bundle' });
  } catch (e) {
    notice('ice', 'error', `The server's ICE settings were rejected (${e.message}); trying without them.`);
    pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
  }
  if (S.localStream) for (const t of S.localStream.getTracks()) pc.addTrack(t, S.localStream);
  pc.onicecandidate = ({ candidate }) => {
    if (candidate && candidate.candidate) {
      signal(peer.id, { type: 'candidate', label: candidate.sdpMLineIndex, id: candidate.sdpMid, candidate: candidate.candidate });
    } else if (!candidate) {
      // End of candidates, once for the whole BUNDLE transport.
      const first = pc.getTransceivers().find((t) => t.mid !== null);
      signal(peer.id, { type: 'candidate', label: 0, id: first ? first.mid : null, candidate: '' });
    }
  };
  pc.ontrack = (ev) => {
    let stream = ev.streams[0];
    if (!stream) {
      if (!peer.stream) peer.stream = new MediaStream();
      peer.stream.addTrack(ev.track);
      stream = peer.stream;
    }
    watchTrack(ev.track, () => refreshTile(peer));
    attachRemote(peer, stream);
  };
  pc.onconnectionstatechange = () => {
    updatePeerState(peer);
    if (pc.connectionState === 'connected') {
      clearTimeout(peer.p2pTimer);
      clearNotice(`peer-${peer.id}`);
    } else if (pc.connectionState === 'failed') {
      reportP2pFailed(peer);
    }
  };
  return pc;
}

export async function startCall(peer) {
  const pc = peer.pc;
  // Receive-only or one-sided media: still ask for both kinds.
  for (const kind of ['audio', 'video']) {
    if (!pc.getTransceivers().some((t) => t.receiver.track.kind === kind)) {
      pc.addTransceiver(kind, { direction: 'recvonly' });
    }
  }
  peer.chain = peer.chain.then(async () => {
    await pc.setLocalDescription(await pc.createOffer());
    signal(peer.id, { type: 'offer', sdp: pc.localDescription.sdp });
  }).catch((e) => notice(`peer-${peer.id}`, 'error', `Could not start the call with ${peer.name || 'a participant'}: ${e.message || e}`));
}

export async function onPeerSignal(peer, data) {
  const pc = peer.pc;
  if (pc.signalingState === 'closed') return;
  switch (data.type) {
    case 'offer': {
      if (typeof data.sdp !== 'string') return;
      // Glare cannot happen with "the one already there offers", but be polite anyway.
      if (pc.signalingState !== 'stable' && !peer.polite) return;
      await pc.setRemoteDescription({ type: 'offer', sdp: data.sdp });
      await flushCandidates(peer);
      await pc.setLocalDescription(await pc.createAnswer());
      signal(peer.id, { type: 'answer', sdp: pc.localDescription.sdp });
      return;
    }
    case 'answer': {
      if (typeof data.sdp !== 'string' || pc.signalingState !== 'have-local-offer') return;
      await pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
      await flushCandidates(peer);
      return;
    }
    case 'candidate': {
      if (!pc.remoteDescription) { peer.pending.push(data); return; }
      await addCandidate(pc, data);
      return;
    }
    default:
  }
}

export async function flushCandidates(peer) {
  const queued = peer.pending.splice(0);
  for (const c of queued) await addCandidate(peer.pc, c);
}

export async function addCandidate(pc, data) {
  const init = { candidate: typeof data.candidate === 'string' ? data.candidate : '' };
  // Prefer the mid; fall back to the m-line index.
  if (typeof data.id === 'string') init.sdpMid = data.id;
  else if (Number.isInteger(data.label)) init.sdpMLineIndex = data.label;
  else if (init.candidate) return;
  try {
    await pc.addIceCandidate(init);
  } catch (e) {
    if (init.candidate) console.warn('addIceCandidate failed:', e, init);
  }
}

export function reportP2pFailed(peer) {
  if (S.mode !== 'p2p' || peer.reportedFailed || !S.room) return;
  peer.reportedFailed = true;
  send({ type: 'p2p-failed', room: S.room, peer: peer.id });
  if (S.timing && !S.timing.p2pFailedAt) S.timing.p2pFailedAt = Date.now();
  notice(`peer-${peer.id}`, 'info', `The direct connection to ${peer.name || 'a participant'} did not work out; asking the server to carry the call.`);
}
