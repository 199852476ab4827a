// What the page shows: the status badges, lobby and call views, the grid
// of tiles and each remote participant's tile.

import { MIX, S, ui } from './state.js';
import { updateChatVisibility } from './chat.js';

export function setWsLabel(label) {
  S.wsLabel = label;
  ui.wsText.textContent = label;
  ui.wsBadge.dataset.state = label;
}

export function setMode(mode) {
  S.mode = mode;
  updateModeBadge();
  updateChatVisibility();
}

// "P2P", or "via server" plus the state of the server connection.
export function updateModeBadge() {
  const mode = S.mode;
  const b = ui.modeBadge;
  b.hidden = !mode;
  b.dataset.mode = mode || '';
  b.textContent = '';
  if (mode === 'sfu') {
    const state = S.sfu ? S.sfu.pc.connectionState : 'new';
    b.dataset.state = state;
    const dot = document.createElement('span');
    dot.className = 'dot';
    dot.setAttribute('aria-hidden', 'true');
    const text = document.createElement('span');
    text.className = 'mode-text';
    text.textContent = 'via server';
    const st = document.createElement('span');
    st.className = 'mode-state';
    st.textContent = state;
    b.append(dot, text, st);
    b.title = `Media is routed through the server (server connection: ${state})`;
  } else {
    delete b.dataset.state;
    b.textContent = mode === 'p2p' ? 'P2P' : '';
    b.title = 'Media flows directly between participants';
    if (mode === 'p2p' && S.serverReach === 'unreachable') {
      b.dataset.state = 'failed';
      b.title += ' (the server is unreachable: a switch to it would fail)';
    }
  }
}

export function showLobby() {
  ui.call.hidden = true;
  ui.lobby.hidden = false;
  ui.roomLabel.hidden = true;
  ui.joinButton.disabled = false;
  setMode(null);
  document.title = 'Switchboard';
}

export function showCall() {
  ui.lobby.hidden = true;
  ui.call.hidden = false;
  ui.roomLabel.hidden = false;
  ui.roomLabel.textContent = S.room || '';
  ui.localName.textContent = S.name ? `${S.name} (you)` : 'You';
  ui.localTile.querySelector('.avatar').textContent = initial(S.name);
  document.title = `${S.room} \u2013 Switchboard`;
  updateLayout();
}

export function updateLayout() {
  const n = S.peers.size;
  ui.tiles.dataset.count = String(n + 1);
  ui.waiting.hidden = n > 0 || S.phase !== 'in-room';
  layoutTiles();
}

// Three or more tiles: a grid of equal 16:9 tiles, with the number of
// columns that makes them largest in the space there is.
const TILE_GAP = 10;
export function layoutTiles() {
  const n = ui.tiles.childElementCount;
  if (n < 3) { delete ui.tiles.dataset.layout; return; }
  ui.tiles.dataset.layout = 'grid';
  const W = ui.tiles.clientWidth;
  const H = ui.tiles.clientHeight;
  if (!W || !H) return;
  let best = { cols: 1, w: 0 };
  for (let cols = 1; cols <= n; cols++) {
    const rows = Math.ceil(n / cols);
    const w = Math.min((W - (cols - 1) * TILE_GAP) / cols, ((H - (rows - 1) * TILE_GAP) / rows) * 16 / 9);
    if (w > best.w + 0.5) best = { cols, w };
  }
  ui.tiles.style.setProperty('--cols', String(best.cols));
  ui.tiles.style.setProperty('--tile-w', `${Math.max(120, Math.floor(best.w))}px`);
}
export function initial(name) {
  const c = (name || '').trim().charAt(0);
  return c ? c.toUpperCase() : '?';
}

export function makeTile(id, name) {
  const tile = ui.template.content.firstElementChild.cloneNode(true);
  tile.dataset.peer = id;
  tile.classList.add('no-video');
  tile.querySelector('.name').textContent = name || 'Guest';
  tile.querySelector('.avatar').textContent = initial(name);
  const video = tile.querySelector('video');
  const refresh = () => { const p = S.peers.get(id); if (p) refreshTile(p); };
  video.addEventListener('loadeddata', refresh);
  video.addEventListener('resize', refresh);
  const unmute = tile.querySelector('.unmute');
  unmute.addEventListener('click', () => {
    video.muted = false;
    video.play().catch(() => {});
    unmute.hidden = true;
  });
  ui.tiles.append(tile);
  return tile;
}

// Calls `onChange` whenever `track` is muted, unmuted or ends (once per track).
const watchedTracks = new WeakSet();
export function watchTrack(track, onChange) {
  if (watchedTracks.has(track)) return;
  watchedTracks.add(track);
  for (const ev of ['mute', 'unmute', 'ended']) track.addEventListener(ev, onChange);
}

export function playMedia(el, onBlocked) {
  el.play().catch((e) => {
    if (e.name !== 'NotAllowedError') return;
    // Autoplay with sound was blocked: play muted and offer to unmute.
    el.muted = true;
    el.play().catch(() => {});
    onBlocked();
  });
}

export function attachRemote(peer, stream) {
  const video = peer.tile.querySelector('video');
  if (video.srcObject !== stream) video.srcObject = stream;
  playMedia(video, () => { peer.tile.querySelector('.unmute').hidden = false; });
  refreshTile(peer);
}

// Shows the video, or the avatar while there is no live, unmuted video track.
export function refreshTile(peer) {
  const video = peer.tile.querySelector('video');
  const stream = video.srcObject;
  const live = !!stream && stream.getVideoTracks().some((t) => t.readyState === 'live' && !t.muted);
  peer.tile.classList.toggle('no-video', !live || video.readyState < 2);
  updatePeerState(peer);
}

export function updatePeerState(peer) {
  const el = peer.tile.querySelector('.pc-state');
  let state;
  let text;
  if (peer.pc) {
    state = peer.pc.connectionState;
    text = state;
  } else if (S.mode === 'sfu' && (!S.sfu || S.sfu.pc.connectionState !== 'connected')) {
    state = S.sfu ? S.sfu.pc.connectionState : 'new';
    text = state === 'new' ? 'connecting' : state;
  } else if (S.mode === 'sfu') {
    const tracks = peer.sfuStream ? peer.sfuStream.getTracks() : [];
    const has = (kind) => tracks.some((t) => t.kind === kind && t.readyState === 'live');
    state = tracks.length ? 'via-server' : 'no-media';
    // In a mix room everyone's audio arrives in the one mixed track.
    const noAudio = !has('audio') && S.audio !== MIX;
    text = !tracks.length ? 'no media' : noAudio ? 'no audio' : !has('video') ? 'audio only' : '';
  } else {
    state = 'via-server';
    text = 'via server';
  }
  el.dataset.state = state;
  el.textContent = text;
}
