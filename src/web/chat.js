// The `chat` data channel on the server connection, and the chat panel.

import { S, ui } from './state.js';
import { notice } from './notices.js';

const CHAT_MAX_CHARS = 1000;
const CHAT_MAX_MESSAGES = 500;

export function wireChat(sfu, dc) {
  dc.onopen = () => { if (S.sfu === sfu) updateChatState(); };
  dc.onclose = () => { if (S.sfu === sfu) updateChatState(); };
  dc.onmessage = (ev) => {
    if (S.sfu !== sfu || typeof ev.data !== 'string') return;
    let msg;
    try { msg = JSON.parse(ev.data); } catch (_) { return; }
    if (!msg || typeof msg.from !== 'string' || typeof msg.data !== 'string') return;
    // The server never echoes our own text; if it ever did, we already show it.
    if (msg.from === S.id) return;
    addChatMessage(msg.from, msg.data, false);
  };
}

export function chatReady() {
  return !!(S.sfu && S.sfu.chat && S.sfu.chat.readyState === 'open');
}

export function updateChatState() {
  const ready = chatReady();
  ui.chatInput.disabled = !ready;
  ui.chatSend.disabled = !ready || !ui.chatInput.value.trim();
  const dc = S.sfu && S.sfu.chat;
  const state = ready ? '' : !dc ? 'offline' : dc.readyState === 'connecting' ? 'connecting\u2026' : 'offline';
  ui.chatState.textContent = state;
  ui.chatState.hidden = !state;
  ui.chatInput.placeholder = ready ? 'Message everyone' : 'Chat connects with the call\u2026';
}

// The chat is part of SFU rooms (it rides on the server connection). On
// wide screens it opens with the room.
export function updateChatVisibility() {
  const available = S.mode === 'sfu' || !!S.sfu;
  ui.chatButton.hidden = !available;
  if (available && S.chatOpen === null) S.chatOpen = window.matchMedia('(min-width: 900px)').matches;
  const open = available && !!S.chatOpen;
  ui.chat.hidden = !open;
  ui.call.classList.toggle('with-chat', open);
  ui.chatButton.setAttribute('aria-pressed', String(open));
  ui.chatButton.title = open ? 'Hide the chat' : 'Show the chat';
  if (open) { S.chatUnread = 0; scrollChat(true); }
  ui.chatUnread.hidden = !S.chatUnread || open;
  ui.chatUnread.textContent = S.chatUnread > 9 ? '9+' : String(S.chatUnread);
}

export function setChatOpen(open) {
  S.chatOpen = open;
  updateChatVisibility();
  if (open && !ui.chatInput.disabled) ui.chatInput.focus();
}

export function sendChat() {
  const text = ui.chatInput.value.trim().slice(0, CHAT_MAX_CHARS);
  if (!text || !chatReady()) return;
  try {
    S.sfu.chat.send(text);
  } catch (e) {
    notice('chat', 'error', `The message was not sent: ${e.message || e}`);
    return;
  }
  addChatMessage(S.id, text, true);
  ui.chatInput.value = '';
  updateChatState();
}

export function addChatMessage(from, text, mine) {
  const near = ui.chatScroll.scrollHeight - ui.chatScroll.scrollTop - ui.chatScroll.clientHeight < 40;
  const li = document.createElement('li');
  li.className = mine ? 'chat-msg mine' : 'chat-msg';
  li.dataset.from = from;
  li.dataset.at = String(Date.now());
  // Messages in a row from one sender within two minutes share one header.
  const prev = ui.chatLog.lastElementChild;
  if (prev && prev.dataset.from === from && Date.now() - Number(prev.dataset.at) < 120000) li.classList.add('cont');
  const head = document.createElement('div');
  head.className = 'chat-meta';
  const who = document.createElement('span');
  who.className = 'chat-from';
  who.textContent = mine ? 'You' : (S.names.get(from) || 'Guest');
  if (!mine) who.style.color = nameColor(from);
  const when = document.createElement('time');
  const now = new Date();
  when.dateTime = now.toISOString();
  when.textContent = now.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  head.append(who, when);
  const body = document.createElement('div');
  body.className = 'chat-text';
  body.textContent = text.slice(0, CHAT_MAX_CHARS);
  li.append(head, body);
  ui.chatLog.append(li);
  while (ui.chatLog.childElementCount > CHAT_MAX_MESSAGES) ui.chatLog.firstElementChild.remove();
  ui.chatEmpty.hidden = true;
  if (!mine && ui.chat.hidden) {
    S.chatUnread++;
    updateChatVisibility();
  }
  scrollChat(mine || near);
}

// A stable, readable colour per participant id.
export function nameColor(id) {
  let h = 0;
  for (const c of id) h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h} 75% 72%)`;
}

export function scrollChat(force) {
  if (force) ui.chatScroll.scrollTop = ui.chatScroll.scrollHeight;
}

export function clearChat() {
  ui.chatLog.textContent = '';
  ui.chatEmpty.hidden = false;
  ui.chatInput.value = '';
  S.chatUnread = 0;
  S.chatOpen = null;
  updateChatVisibility();
  updateChatState();
}
