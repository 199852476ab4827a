// Switchboard browser client: signaling protocol v1 over one WebSocket at /ws,
// P2P calls between two participants; in SFU rooms one RTCPeerConnection to the
// server's peer "sfu" carries everyone's media and the `chat` data channel.
// Plain JS as ES modules, no build step, no external URLs. This module wires
// the page up and starts it; the others each do one job (see their heads).

import { S, ui } from './state.js';
import { notice } from './notices.js';
import { layoutTiles, showLobby } from './view.js';
import { toggleTrack, updateLocalControls } from './media.js';
import { sendChat, setChatOpen, updateChatState } from './chat.js';
import { join, leave } from './session.js';
import { installTestHooks, startTimings } from './testhooks.js';
import { tokenClaims, tokenName, tokenRoom } from './token.js';

ui.form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  join(ui.room.value, ui.name.value);
});
ui.mic.addEventListener('click', () => toggleTrack('audio'));
ui.cam.addEventListener('click', () => toggleTrack('video'));
ui.leave.addEventListener('click', () => leave());
ui.chatButton.addEventListener('click', () => setChatOpen(ui.chat.hidden));
ui.chatClose.addEventListener('click', () => { setChatOpen(false); ui.chatButton.focus(); });
ui.chatInput.addEventListener('input', updateChatState);
ui.chat.addEventListener('keydown', (ev) => {
  // Escape closes the chat where it covers the call.
  if (ev.key === 'Escape' && getComputedStyle(ui.chat).position === 'fixed') {
    setChatOpen(false);
    ui.chatButton.focus();
  }
});
ui.chatForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  sendChat();
});
ui.copyLink.addEventListener('click', async () => {
  // Never our token: it is who we are. Others need their own.
  const link = `${location.origin}/?room=${encodeURIComponent(S.room || '')}`;
  const own = S.token ? ' Each person needs their own access token (?token=) to join.' : '';
  try {
    await navigator.clipboard.writeText(link);
    notice('copy', 'info', `Invite link copied.${own}`);
  } catch (_) {
    notice('copy', 'info', `Invite link: ${link}`, { sticky: true });
  }
});
window.addEventListener('pagehide', () => { if (S.ws) S.ws.close(1000, 'page closed'); });
if (window.ResizeObserver) new ResizeObserver(() => layoutTiles()).observe(ui.tiles);
installTestHooks();

// Start: room (and name) from the URL; both present means join right away.
// With `?token=` (auth on) the token's room and name are the defaults.
const params = new URLSearchParams(location.search);
S.token = params.get('token') || null;
const claims = tokenClaims(S.token);
const urlRoom = params.get('room') || tokenRoom(claims);
const urlName = params.get('name') || tokenName(claims);
// Optional settings for the join that creates the room (ignored otherwise).
const urlMode = params.get('mode');
const urlAudio = params.get('audio');
if (['auto', 'p2p', 'sfu'].includes(urlMode)) S.joinMode = urlMode;
if (['mix', 'forward'].includes(urlAudio)) S.joinAudio = urlAudio;
if (params.get('standby') === '0') S.standby = false;
if (params.get('simulcast') === '0') S.simulcast = false;
if (params.get('timings') === '1') startTimings();
let savedName = '';
try { savedName = localStorage.getItem('switchboard.name') || ''; } catch (_) { /* private mode */ }
ui.room.value = urlRoom;
ui.name.value = urlName || savedName;
updateLocalControls();
showLobby();
if (urlRoom && urlName) join(urlRoom, urlName);
else (urlRoom ? ui.name : ui.room).focus();
