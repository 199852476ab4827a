// Moving a call from P2P to the server (make before break), and, during a
// P2P call, whether the server's media port is reachable.

import { S, ui } from './state.js';
import { clearNotice, notice } from './notices.js';
import { attachRemote, updateModeBadge, updatePeerState } from './view.js';
import { closePeerPc } from './p2p.js';
import { openSfu } from './sfu.js';
import { inbound, sfuOwner } from './stats.js';

// Make-before-break: how long P2P media stays on screen at most while the
// server connection has not delivered a frame of that participant yet.
const SWITCH_MAX_WAIT_MS = 10000;
const SWITCH_POLL_MS = 100;

// The room now goes via the server: open the one connection to the
// server's peer "sfu" (or use the warm standby, already open). Make before
// break: a direct connection that works keeps its media on screen until the
// server delivers that participant (see setPeerMedia); one that does not
// goes at once.
export function connectToSfu(reason) {
  const why = reason === 'third-participant' ? 'A third person joined, so the call now goes via the server.'
    : reason === 'p2p-failed' ? 'A direct connection failed, so the call now goes via the server.'
      : '';
  if (why) notice('sfu', 'info', why);
  stopServerReachWatch();
  clearNotice('server-reach');
  for (const peer of S.peers.values()) {
    if (peer.pc && peer.pc.connectionState !== 'connected') closePeerPc(peer);
    else if (peer.pc) armSwitch(peer);
  }
  if (!S.sfu) openSfu();
  else if (S.sfu.pc.connectionState === 'failed') {
    // The standby never got through (we warned during the P2P call).
    notice('sfu-conn', 'error', 'The media connection to the server failed. Leave and join again to retry.');
  }
  for (const peer of S.peers.values()) updatePeerState(peer);
}

// Closes `peer`'s direct connection once the server has delivered a video
// frame of it (audio packets when it sends no video), or after
// SWITCH_MAX_WAIT_MS at the latest. Polls getStats; bounded.
export function armSwitch(peer) {
  if (peer.switchTimer) return;
  peer.switchedBy = null;
  const started = Date.now();
  // What the server connection has already decoded of this participant
  // counts for nothing: after a return to p2p its old tracks still hold
  // frames from the earlier sfu period.
  const counts = async () => {
    if (!S.sfu) return { video: 0, audio: 0, hasVideo: false };
    const mine = (x) => x.peer === peer.id;
    const video = (await inbound(S.sfu.pc, 'video', sfuOwner).catch(() => [])).filter(mine);
    const audio = (await inbound(S.sfu.pc, 'audio', sfuOwner).catch(() => [])).filter(mine);
    return {
      video: video.reduce((n, x) => n + x.framesDecoded, 0),
      audio: audio.reduce((n, x) => n + x.packetsReceived, 0),
      hasVideo: video.length > 0,
    };
  };
  const baseline = counts();
  const tick = async () => {
    peer.switchTimer = null;
    if (S.peers.get(peer.id) !== peer || !peer.pc) return;
    if (S.mode !== 'sfu') return;
    const base = await baseline;
    const now = await counts();
    const delivered = now.hasVideo ? now.video > base.video : now.audio > base.audio;
    if (S.peers.get(peer.id) !== peer || !peer.pc || S.mode !== 'sfu') return;
    const down = peer.pc.connectionState !== 'connected';
    if (delivered || down || Date.now() - started > SWITCH_MAX_WAIT_MS) {
      peer.switchedBy = delivered ? 'server-delivered' : down ? 'p2p-down' : 'timeout';
      closePeerPc(peer);
      if (peer.sfuStream) attachRemote(peer, peer.sfuStream);
      return;
    }
    peer.switchTimer = setTimeout(tick, SWITCH_POLL_MS);
  };
  peer.switchTimer = setTimeout(tick, SWITCH_POLL_MS);
}

// ---------------------------------------------------------------- server reachability (P2P)

// During a P2P call the warm standby connection tells whether the server's
// media port is reachable: it must reach `connected` within p2pTimeoutMs.
// If it does not, a third person joining (or the direct connection failing)
// would break the call, so say so now instead of silently breaking later.
export function watchServerReach() {
  stopServerReachWatch();
  if (!S.sfu || S.mode !== 'p2p') { setServerReach('unknown'); return; }
  const state = S.sfu.pc.connectionState;
  if (state === 'connected') { setServerReach('reachable'); return; }
  if (state === 'failed') { setServerReach('unreachable'); return; }
  setServerReach('checking');
  S.reachTimer = setTimeout(() => {
    S.reachTimer = null;
    if (S.mode === 'p2p' && S.serverReach === 'checking') setServerReach('unreachable');
  }, Math.max(S.p2pTimeoutMs, 3000));
}

export function stopServerReachWatch() {
  if (S.reachTimer) clearTimeout(S.reachTimer);
  S.reachTimer = null;
}

export function setServerReach(state) {
  const before = S.serverReach;
  S.serverReach = state;
  ui.modeBadge.dataset.serverReach = state;
  if (state === 'unreachable' && S.mode === 'p2p') {
    if (before !== 'unreachable') {
      notice('server-reach', 'error', 'Warning: the server\'s media port cannot be reached from this network. '
        + 'This direct call works, but it will break if a third person joins or the direct connection drops.', { sticky: true });
    }
  } else {
    clearNotice('server-reach');
  }
  updateModeBadge();
}
