// Server messages (protocol v1): what each one does to the page.

import { S, SFU, ui } from './state.js';
import { clearNotice, notice } from './notices.js';
import { setMode, showCall, updateLayout } from './view.js';
import { resumeFailed, send } from './socket.js';
import { addPeer, onPeerSignal, removePeer, setPeerName, startCall, startP2p } from './p2p.js';
import { connectToSfu, watchServerReach } from './switch.js';
import { onSfuSignal, openSfu, restartSfuIce } from './sfu.js';
import { backToLobby } from './session.js';
import { onPublisherLayers, resendTrackSettings } from './layers.js';

export function onServerMessage(msg) {
  switch (msg.type) {
    case 'joined': return onJoined(msg);
    case 'resumed': return onResumed(msg);
    case 'otherjoin': return onOtherJoin(msg);
    case 'bye': return onBye(msg);
    case 'leaved': if (S.leavedWaiter) S.leavedWaiter(); return undefined;
    case 'full':
      notice('room', 'error', `Room "${msg.room || S.room}" is full.`);
      return backToLobby();
    case 'message': return onRelayed(msg);
    case 'mode': return onModeChange(msg);
    case 'error': return onError(msg);
    case 'pong': S.lastPong = Date.now(); return undefined;
    case 'speakers': return onSpeakers(msg);
    case 'publisher-layers': return onPublisherLayers(msg);
    default: return undefined; // unknown types are ignored
  }
}

// Highlights the tiles of whoever the server says is speaking now.
export function onSpeakers(msg) {
  const list = Array.isArray(msg.speakers) ? msg.speakers : [];
  S.speakers = list
    .filter((x) => x && typeof x.id === 'string')
    .map((x) => ({ id: x.id, level: Math.min(1, Math.max(0, Number(x.level) || 0)) }));
  S.speakerEvents += 1;
  const loudness = new Map(S.speakers.map((x) => [x.id, x.level]));
  const mark = (tile, id) => {
    tile.classList.toggle('speaking', loudness.has(id));
    tile.classList.toggle('loudest', S.speakers.length > 0 && S.speakers[0].id === id);
  };
  for (const peer of S.peers.values()) mark(peer.tile, peer.id);
  mark(ui.localTile, S.id);
}

// `resume` accepted: same id, same calls; only signaling was gone. Peers
// that left meanwhile are told by the `bye`s that follow.
export function onResumed(msg) {
  S.phase = 'in-room';
  S.resuming = false;
  S.reconnectAttempts = 0;
  S.resumes += 1;
  if (typeof msg.resumeToken === 'string') S.resumeToken = msg.resumeToken;
  S.iceServers = Array.isArray(msg.iceServers) ? msg.iceServers : S.iceServers;
  if (Array.isArray(msg.features)) S.features = features(msg);
  if (S.timing) S.timing.resumedAt = Date.now();
  setMode(msg.mode);
  notice('ws', 'info', 'Reconnected.');
  updateLayout();
  // Signaling died with the network? The media path may need its restart.
  restartSfuIce();
  // What we want of each track: cheap to say again.
  resendTrackSettings();
}

// `features` (1.1) of a `joined` or `resumed`: the strings only.
function features(msg) {
  return Array.isArray(msg.features) ? msg.features.filter((f) => typeof f === 'string') : [];
}

export function onJoined(msg) {
  const rejoined = S.reconnectAttempts > 0;
  S.phase = 'in-room';
  S.reconnectAttempts = 0;
  S.resuming = false;
  S.resumeToken = typeof msg.resumeToken === 'string' ? msg.resumeToken : null;
  S.resumeWindowMs = Number.isFinite(msg.resumeWindowMs) ? msg.resumeWindowMs : 0;
  S.id = msg.id;
  S.room = msg.room;
  S.audio = msg.audio;
  S.iceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
  S.p2pTimeoutMs = Number.isFinite(msg.p2pTimeoutMs) ? msg.p2pTimeoutMs : 5000;
  S.features = features(msg);
  S.gone.clear();
  setMode(msg.mode);
  clearNotice('ws');
  clearNotice('room');
  if (rejoined) notice('ws', 'info', 'Reconnected.');
  const url = new URL(location.href);
  // The token stays in the URL so that a reload joins again.
  url.search = `?room=${encodeURIComponent(S.room)}${S.token ? `&token=${encodeURIComponent(S.token)}` : ''}`;
  history.replaceState(null, '', url);
  showCall();
  // The newcomer waits for the offers of those already here.
  for (const p of Array.isArray(msg.peers) ? msg.peers : []) {
    if (p && typeof p.id === 'string') addPeer(p.id, p.name, { polite: true });
  }
  if (S.timing) { S.timing.joinedAt = Date.now(); S.timing.p2pFailedAt = null; S.timing.modeAt = null; }
  if (S.mode === 'sfu') connectToSfu();
  else if (S.standby && !S.sfu) openSfu();
  updateLayout();
}

export function onOtherJoin(msg) {
  if (!msg.id || msg.id === S.id) return;
  const known = S.peers.get(msg.id);
  if (known && !known.pc) {
    // Its media came through the server before this message did: keep the tile, name it.
    setPeerName(known, msg.name);
    return;
  }
  removePeer(msg.id);
  const peer = addPeer(msg.id, msg.name, { polite: false });
  // The participant already in the room makes the offer; never in an SFU room.
  if (peer.pc) startCall(peer);
}

export function onBye(msg) {
  if (typeof msg.id !== 'string') return;
  S.gone.add(msg.id);
  removePeer(msg.id);
}

export function onModeChange(msg) {
  const before = S.mode;
  setMode(msg.mode);
  if (S.timing) {
    S.timing.modeAt = Date.now();
    S.timing.modeReason = msg.reason || null;
    if (msg.reason === 'p2p-failed' && !S.timing.p2pFailedAt) S.timing.p2pFailedAt = S.timing.modeAt;
  }
  if (msg.mode === 'sfu' && before !== 'sfu') {
    connectToSfu(msg.reason);
  } else if (msg.mode === 'p2p' && before === 'sfu') {
    // Back to two people (the server's --p2p-return-ms): call the other one
    // directly again. The server stops forwarding at once; its connection
    // stays as the warm standby, and the tile takes the direct media when
    // its tracks arrive.
    clearNotice('sfu');
    notice('sfu', 'info', 'Only two of you now, so the call goes direct again.');
    for (const peer of S.peers.values()) {
      if (peer.pc) continue;
      startP2p(peer);
      // The lower id offers: both sides agree without knowing who came first.
      if (S.id < peer.id) startCall(peer);
    }
    watchServerReach();
  }
  updateLayout();
}

// Errors of access control, said in words: `unauthorized` (the join was
// refused), `replaced` (the same identity joined elsewhere), `removed` (by an
// administrator) end our membership, and joining again by ourselves would
// only fail again or push the other connection out, so the page goes back to
// the lobby and stays there. `forbidden` (a grant does not allow something)
// leaves us in the call.
const ACCESS_ERRORS = {
  unauthorized: (why) => `Access denied: the server did not accept your access token (${why}). `
    + 'Ask whoever sent you the link for a new one.',
  replaced: () => 'You joined this room from another tab or device, so this one left the call.',
  removed: () => 'An administrator removed you from the call.',
  forbidden: (why) => `Not allowed: ${why}`,
};
export const OUT_FOR_GOOD = ['unauthorized', 'replaced', 'removed'];

export function onError(msg) {
  const code = msg.code || 'error';
  if (code === 'resume-failed') { resumeFailed(); return; }
  // Cluster mode: the node hosting the room died; the same join lands on a
  // live node (also while resuming: the resume went to the dead node).
  if (code === 'room-closed' && msg.rejoin === true && ['in-room', 'reconnecting'].includes(S.phase)) {
    resumeFailed('The server hosting this call stopped; joining the room again\u2026');
    return;
  }
  const why = msg.message || 'no details';
  const text = ACCESS_ERRORS[code] ? ACCESS_ERRORS[code](why) : `Error ${code}: ${why}`;
  notice(`error-${code}`, 'error', text);
  // A failed join leaves us outside any room; a closed room puts us outside it.
  if (OUT_FOR_GOOD.includes(code) || (msg.request === 'join' && S.phase !== 'in-room') || code === 'room-closed') {
    backToLobby();
  }
}

export function onRelayed(msg) {
  const from = msg.from;
  const data = msg.data;
  if (!data || typeof data !== 'object' || typeof from !== 'string') return;
  if (from === SFU) { onSfuSignal(data); return; }
  let peer = S.peers.get(from);
  if (!peer) {
    // An offer from someone we were not told about: accept it rather than drop the call.
    if (data.type !== 'offer' || S.mode === 'sfu' || S.gone.has(from)) return;
    peer = addPeer(from, '', { polite: true });
  }
  if (!peer.pc) return;
  peer.chain = peer.chain.then(() => onPeerSignal(peer, data)).catch((e) => {
    console.warn('signaling with', peer.id, 'failed:', e);
    notice(`peer-${peer.id}`, 'error', `Call setup with ${peer.name || 'a participant'} failed: ${e.message || e}`);
  });
}

export function signal(to, data) {
  send({ type: 'message', room: S.room, to, data });
}
