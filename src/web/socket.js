// The signaling WebSocket: open (and send `join`, with the access token if
// there is one), keep alive with pings, reconnect with backoff when it drops:
// first by `resume` (1.1) within the server's window, the calls staying up;
// if that is refused, by a fresh join.

import { S } from './state.js';
import { notice } from './notices.js';
import { setWsLabel, updateLayout } from './view.js';
import { onServerMessage } from './protocol.js';
import { closeAllPeers } from './p2p.js';
import { closeSfu } from './sfu.js';
import { backToLobby } from './session.js';

const PING_INTERVAL_MS = 20000;
const RECONNECT_MAX_ATTEMPTS = 6;
// Resume attempts: 250 ms doubling to 4 s, with jitter, within the window.
const RESUME_FIRST_MS = 250;
const RESUME_MOST_MS = 4000;

export function wsUrl() {
  return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
}

export function send(msg) {
  const ws = S.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(msg));
  return true;
}

export function openSocket() {
  const gen = ++S.wsGen;
  setWsLabel(S.phase === 'reconnecting' ? 'reconnecting' : 'connecting');
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch (e) {
    notice('ws', 'error', `Cannot open a connection to the server: ${e.message}`);
    backToLobby();
    return;
  }
  S.ws = ws;
  ws.onopen = () => {
    if (gen !== S.wsGen) return;
    setWsLabel('connected');
    S.lastPong = Date.now();
    startPing();
    if (S.resuming) {
      send({ type: 'resume', room: S.room, id: S.id, resumeToken: S.resumeToken });
      return;
    }
    send(joinMessage());
  };
  ws.onmessage = (ev) => {
    if (gen !== S.wsGen) return;
    let msg;
    try { msg = JSON.parse(ev.data); } catch (_) { return; }
    if (msg && typeof msg === 'object') onServerMessage(msg);
  };
  ws.onerror = () => { /* followed by close */ };
  ws.onclose = (ev) => { if (gen === S.wsGen) onSocketLost(ev); };
}

function joinMessage() {
  const msg = { type: 'join', room: S.room, name: S.name };
  if (S.joinMode) msg.mode = S.joinMode;
  if (S.joinAudio) msg.audio = S.joinAudio;
  if (S.token) msg.token = S.token;
  return msg;
}

// Drops the current socket without triggering the lost-connection path.
export function closeSocket() {
  stopPing();
  S.wsGen++;
  const ws = S.ws;
  S.ws = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'bye');
  setWsLabel('offline');
}

export function onSocketLost(ev) {
  stopPing();
  S.ws = null;
  setWsLabel('closed');
  if (S.leavedWaiter) S.leavedWaiter();
  const wasIn = S.phase === 'in-room' || S.phase === 'reconnecting';
  if (S.phase === 'leaving' || S.phase === 'lobby') return;
  if (wasIn && S.resumeToken && S.id && resumeLeft() > 0) {
    // The calls stay up; only signaling comes back.
    S.phase = 'reconnecting';
    if (!S.resuming) S.resumingSince = Date.now();
    S.resuming = true;
    const base = Math.min(RESUME_MOST_MS, RESUME_FIRST_MS * 2 ** Math.min(S.reconnectAttempts, 5));
    const delay = Math.round(base * (0.7 + Math.random() * 0.6));
    S.reconnectAttempts++;
    notice('ws', 'info', 'Lost the connection to the server; the call goes on. Reconnecting\u2026');
    setWsLabel('reconnecting');
    S.reconnectTimer = setTimeout(() => { S.reconnectTimer = null; if (S.phase === 'reconnecting') openSocket(); }, delay);
    return;
  }
  S.resuming = false;
  closeAllPeers();
  closeSfu();
  S.id = null;
  if (!wasIn) {
    notice('ws', 'error', `Could not connect to the server${ev && ev.code && ev.code !== 1006 ? ` (code ${ev.code})` : ''}. Please try again.`);
    backToLobby();
    return;
  }
  if (S.reconnectAttempts >= RECONNECT_MAX_ATTEMPTS) {
    notice('ws', 'error', 'The server is gone and did not come back. Please try again later.');
    backToLobby();
    return;
  }
  S.phase = 'reconnecting';
  const delay = Math.min(15000, 1000 * 2 ** S.reconnectAttempts) + Math.floor(Math.random() * 500);
  S.reconnectAttempts++;
  notice('ws', 'error', `Lost the connection to the server. Reconnecting in ${Math.round(delay / 1000)} s\u2026`);
  setWsLabel('reconnecting');
  updateLayout();
  S.reconnectTimer = setTimeout(() => { S.reconnectTimer = null; if (S.phase === 'reconnecting') openSocket(); }, delay);
}

// What is left of the resume window since the connection was lost, in ms.
function resumeLeft() {
  if (!S.resuming) return S.resumeWindowMs;
  return S.resumeWindowMs - (Date.now() - S.resumingSince);
}

// `resume` was refused (too late, or the server restarted). The server
// answered, so it is there; it just does not know us: drop the old calls
// and join afresh on this connection, at once (no backoff).
export function resumeFailed(text = 'The server no longer knew this call; joining the room again\u2026') {
  S.resuming = false;
  S.resumeToken = null;
  closeAllPeers();
  closeSfu();
  S.id = null;
  S.phase = 'reconnecting';
  notice('ws', 'info', text);
  if (!send(joinMessage())) onSocketLost({ code: 4001 });
}

export function startPing() {
  stopPing();
  S.pingTimer = setInterval(() => {
    if (!S.ws) return;
    if (Date.now() - S.lastPong > 2.5 * PING_INTERVAL_MS) {
      // No pong for too long: the connection is dead even if the browser has not noticed.
      const ev = { code: 4000 };
      S.wsGen++;
      try { S.ws.close(); } catch (_) { /* ignore */ }
      onSocketLost(ev);
      return;
    }
    send({ type: 'ping', id: ++S.pingSeq });
  }, PING_INTERVAL_MS);
}

// The media path broke: is signaling still alive? A ping that gets no pong
// within PROBE_MS means the socket died with the network (nothing tells a
// browser that a TCP connection's address went away); it is dropped and
// resumed, so what follows (an ICE restart offer) can go out.
const PROBE_MS = 2000;
export function probeSocket() {
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return;
  const sent = Date.now();
  send({ type: 'ping', id: ++S.pingSeq });
  setTimeout(() => {
    if (!S.ws || S.lastPong >= sent) return;
    const ev = { code: 4000 };
    S.wsGen++;
    try { S.ws.close(); } catch (_) { /* ignore */ }
    onSocketLost(ev);
  }, PROBE_MS);
}

// Drops a socket believed dead with the network (the media path broke
// without a word) and reconnects at once, resuming.
export function dropSocket() {
  if (!S.ws) return;
  S.wsGen++;
  try { S.ws.close(); } catch (_) { /* ignore */ }
  onSocketLost({ code: 4002 });
}

export function stopPing() {
  if (S.pingTimer) clearInterval(S.pingTimer);
  S.pingTimer = null;
}
