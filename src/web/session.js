// Joining and leaving a room, and going back to the lobby.

import { S, ui } from './state.js';
import { clearNotice, notice } from './notices.js';
import { setMode, showCall, showLobby } from './view.js';
import { startLocalMedia, stopLocalMedia } from './media.js';
import { closeSocket, openSocket, send } from './socket.js';
import { OUT_FOR_GOOD } from './protocol.js';
import { closeAllPeers } from './p2p.js';
import { closeSfu } from './sfu.js';
import { clearChat } from './chat.js';

const LEAVE_TIMEOUT_MS = 3000;
const ROOM_RE = /^[A-Za-z0-9_.-]{1,128}$/;

export async function join(room, name) {
  if (S.phase !== 'lobby') return;
  room = room.trim();
  name = name.trim().slice(0, 64);
  if (!ROOM_RE.test(room)) {
    notice('room', 'error', 'Room names use letters, digits, "_", "." and "-" only (up to 128).');
    return;
  }
  clearNotice('room');
  clearNotice('ws');
  for (const code of OUT_FOR_GOOD) clearNotice(`error-${code}`);
  S.phase = 'joining';
  S.room = room;
  S.name = name;
  S.reconnectAttempts = 0;
  ui.joinButton.disabled = true;
  try { localStorage.setItem('switchboard.name', name); } catch (_) { /* private mode */ }
  showCall();
  await startLocalMedia();
  if (S.phase !== 'joining') return;
  openSocket();
}

export async function leave() {
  if (S.phase === 'lobby' || S.phase === 'leaving') return;
  const wasIn = S.phase === 'in-room';
  S.phase = 'leaving';
  closeAllPeers();
  closeSfu();
  if (wasIn && S.id && send({ type: 'leave', room: S.room })) {
    await new Promise((resolve) => {
      const t = setTimeout(resolve, LEAVE_TIMEOUT_MS);
      S.leavedWaiter = () => { clearTimeout(t); resolve(); };
    });
    S.leavedWaiter = null;
  }
  backToLobby();
}

export function backToLobby() {
  S.phase = 'lobby';
  if (S.reconnectTimer) clearTimeout(S.reconnectTimer);
  S.reconnectTimer = null;
  closeAllPeers();
  closeSfu();
  closeSocket();
  stopLocalMedia();
  clearNotice('sfu');
  clearNotice('autoplay');
  clearNotice('server-reach');
  S.serverReach = 'unknown';
  S.id = null;
  S.gone.clear();
  S.names.clear();
  clearChat();
  setMode(null);
  ui.room.value = S.room || ui.room.value;
  ui.name.value = S.name || ui.name.value;
  showLobby();
}
