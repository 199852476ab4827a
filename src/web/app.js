// Switchboard browser client: signaling protocol v1 over one WebSocket at /ws,
// P2P calls between two participants; in SFU rooms one RTCPeerConnection to the
// server's peer "sfu" carries everyone's media and the `chat` data channel.
// Plain JS, no build step, no external URLs.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    lobby: $('lobby'), form: $('join-form'), room: $('room-input'), name: $('name-input'),
    joinButton: $('join-button'),
    call: $('call'), tiles: $('tiles'), waiting: $('waiting'), copyLink: $('copy-link'),
    localTile: $('local-tile'), localVideo: $('local-video'), localName: $('local-name'),
    localFlags: $('local-flags'),
    mic: $('mic-button'), cam: $('cam-button'), leave: $('leave-button'),
    roomLabel: $('room-label'), modeBadge: $('mode-badge'), wsBadge: $('ws-badge'), wsText: $('ws-text'),
    notices: $('notices'), template: $('remote-tile-template'),
    chat: $('chat'), chatButton: $('chat-button'), chatUnread: $('chat-unread'), chatClose: $('chat-close'),
    chatState: $('chat-state'), chatScroll: $('chat-scroll'), chatEmpty: $('chat-empty'), chatLog: $('chat-log'),
    chatForm: $('chat-form'), chatInput: $('chat-input'), chatSend: $('chat-send'),
  };

  const PING_INTERVAL_MS = 20000;
  const LEAVE_TIMEOUT_MS = 3000;
  const RECONNECT_MAX_ATTEMPTS = 6;
  const ROOM_RE = /^[A-Za-z0-9_.-]{1,128}$/;
  const CHAT_MAX_CHARS = 1000;
  const CHAT_MAX_MESSAGES = 500;
  const SFU = 'sfu'; // the server's reserved participant id
  const MIX = 'mix'; // stream id of the mixed audio in `audio: "mix"` rooms
  // Make-before-break: how long P2P media stays on screen at most while the
  // server connection has not delivered a frame of that participant yet.
  const SWITCH_MAX_WAIT_MS = 10000;
  const SWITCH_POLL_MS = 100;
  const TIMING_SAMPLE_MS = 50; // frame sampling for window.sb timings (?timings=1)
  const TIMING_MAX_FRAMES = 4000; // frame-advance timestamps kept per remote

  // Everything the client knows. `phase`: lobby | joining | in-room | reconnecting | leaving.
  const S = {
    phase: 'lobby',
    ws: null, wsGen: 0, wsLabel: 'offline',
    id: null, room: null, name: '', mode: null, audio: null,
    joinMode: null, joinAudio: null, // optional `mode` / `audio` for the join that creates the room
    iceServers: [], p2pTimeoutMs: 5000,
    peers: new Map(), // id -> peer (see addPeer)
    gone: new Set(), // ids that said bye: media still arriving for them is ignored
    names: new Map(), // id -> display name of everyone seen, for chat history
    sfu: null, // the server connection (see openSfu)
    mixAudio: null, // <audio> playing the server's mix
    speakers: [], // the last `speakers`: [{ id, level }], loudest first
    speakerEvents: 0,
    chatUnread: 0, chatOpen: null,
    localStream: null,
    pingTimer: null, pingSeq: 0, lastPong: 0,
    reconnectAttempts: 0, reconnectTimer: null,
    leavedWaiter: null,
    // Warm standby: open the server connection during P2P calls too (carries
    // no media until the room goes sfu; makes the switch near-instant and
    // tells us whether the server's media port is reachable). `?standby=0` turns it off.
    standby: true,
    serverReach: 'unknown', // unknown | checking | reachable | unreachable
    reachTimer: null,
    // Timings for tests (`?timings=1`): epoch ms.
    timing: null,
  };

  // ---------------------------------------------------------------- notices

  // Shows a banner. Same `key` replaces the previous one. Errors stay until
  // dismissed or replaced; info notices fade after a while unless sticky.
  function notice(key, kind, text, { sticky = false } = {}) {
    clearNotice(key);
    const el = document.createElement('div');
    el.className = `notice notice-${kind}`;
    el.dataset.key = key;
    el.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    const span = document.createElement('span');
    span.textContent = text;
    const close = document.createElement('button');
    close.type = 'button';
    close.className = 'notice-close';
    close.setAttribute('aria-label', 'Dismiss');
    close.textContent = '\u00d7';
    close.addEventListener('click', () => el.remove());
    el.append(span, close);
    ui.notices.append(el);
    if (kind !== 'error' && !sticky) setTimeout(() => el.remove(), 8000);
    return el;
  }
  function clearNotice(key) {
    for (const el of ui.notices.querySelectorAll('.notice')) if (el.dataset.key === key) el.remove();
  }

  // ---------------------------------------------------------------- status UI

  function setWsLabel(label) {
    S.wsLabel = label;
    ui.wsText.textContent = label;
    ui.wsBadge.dataset.state = label;
  }

  function setMode(mode) {
    S.mode = mode;
    updateModeBadge();
    updateChatVisibility();
  }

  // "P2P", or "via server" plus the state of the server connection.
  function updateModeBadge() {
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

  function showLobby() {
    ui.call.hidden = true;
    ui.lobby.hidden = false;
    ui.roomLabel.hidden = true;
    ui.joinButton.disabled = false;
    setMode(null);
    document.title = 'Switchboard';
  }

  function showCall() {
    ui.lobby.hidden = true;
    ui.call.hidden = false;
    ui.roomLabel.hidden = false;
    ui.roomLabel.textContent = S.room || '';
    ui.localName.textContent = S.name ? `${S.name} (you)` : 'You';
    ui.localTile.querySelector('.avatar').textContent = initial(S.name);
    document.title = `${S.room} \u2013 Switchboard`;
    updateLayout();
  }

  function updateLayout() {
    const n = S.peers.size;
    ui.tiles.dataset.count = String(n + 1);
    ui.waiting.hidden = n > 0 || S.phase !== 'in-room';
    layoutTiles();
  }

  // Three or more tiles: a grid of equal 16:9 tiles, with the number of
  // columns that makes them largest in the space there is.
  const TILE_GAP = 10;
  function layoutTiles() {
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
  if (window.ResizeObserver) new ResizeObserver(() => layoutTiles()).observe(ui.tiles);

  function initial(name) {
    const c = (name || '').trim().charAt(0);
    return c ? c.toUpperCase() : '?';
  }

  // ---------------------------------------------------------------- local media

  function describeMediaError(e) {
    switch (e && e.name) {
      case 'NotAllowedError': case 'SecurityError':
        return 'Camera and microphone access was refused.';
      case 'NotFoundError': case 'OverconstrainedError':
        return 'No camera or microphone was found.';
      case 'NotReadableError': case 'AbortError':
        return 'The camera or microphone is in use by another application.';
      default:
        return `Camera and microphone are unavailable (${(e && (e.name || e.message)) || 'unknown error'}).`;
    }
  }

  async function startLocalMedia() {
    if (S.localStream) return;
    const md = navigator.mediaDevices;
    if (!md || !md.getUserMedia) {
      notice('media', 'error', 'This page cannot use a camera here (it needs HTTPS or localhost). '
        + 'You can still join and see and hear the others.');
      updateLocalControls();
      return;
    }
    let firstError = null;
    try {
      S.localStream = await md.getUserMedia({ audio: true, video: { width: { ideal: 1280 }, height: { ideal: 720 } } });
    } catch (e) {
      firstError = e;
      // Missing or busy device: try each kind alone. A refusal covers both, so stop there.
      if (e.name !== 'NotAllowedError' && e.name !== 'SecurityError') {
        for (const c of [{ video: true }, { audio: true }]) {
          try { S.localStream = await md.getUserMedia(c); break; } catch (_) { /* next */ }
        }
      }
    }
    if (firstError) {
      const got = S.localStream ? (S.localStream.getVideoTracks().length ? 'camera only' : 'microphone only') : null;
      notice('media', 'error', describeMediaError(firstError) + (got
        ? ` Continuing with ${got}.`
        : ' You can still join and see and hear the others (receive-only).'));
    }
    ui.localVideo.srcObject = S.localStream;
    updateLocalControls();
  }

  function stopLocalMedia() {
    if (S.localStream) for (const t of S.localStream.getTracks()) t.stop();
    S.localStream = null;
    ui.localVideo.srcObject = null;
  }

  function updateLocalControls() {
    const a = S.localStream ? S.localStream.getAudioTracks()[0] : null;
    const v = S.localStream ? S.localStream.getVideoTracks()[0] : null;
    setToggle(ui.mic, a, 'Mute', 'Unmute', 'Mute microphone', 'Unmute microphone', 'No microphone');
    setToggle(ui.cam, v, 'Camera off', 'Camera on', 'Turn camera off', 'Turn camera on', 'No camera');
    ui.localTile.classList.toggle('no-video', !v || !v.enabled);
    const flags = [];
    if (!S.localStream) flags.push('receive-only');
    else if (!a) flags.push('no mic');
    else if (!a.enabled) flags.push('muted');
    ui.localFlags.textContent = flags.join(' \u00b7 ');
  }

  function setToggle(button, track, onLabel, offLabel, onTitle, offTitle, missing) {
    const label = button.querySelector('.label');
    button.disabled = !track;
    const off = !!track && !track.enabled;
    button.setAttribute('aria-pressed', String(off));
    button.classList.toggle('off', off || !track);
    label.textContent = !track ? missing : off ? offLabel : onLabel;
    button.title = !track ? missing : off ? offTitle : onTitle;
  }

  function toggleTrack(kind) {
    if (!S.localStream) return;
    const tracks = kind === 'audio' ? S.localStream.getAudioTracks() : S.localStream.getVideoTracks();
    for (const t of tracks) t.enabled = !t.enabled;
    updateLocalControls();
  }

  // ---------------------------------------------------------------- WebSocket

  function wsUrl() {
    return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
  }

  function send(msg) {
    const ws = S.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  function openSocket() {
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
      const join = { type: 'join', room: S.room, name: S.name };
      if (S.joinMode) join.mode = S.joinMode;
      if (S.joinAudio) join.audio = S.joinAudio;
      send(join);
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

  // Drops the current socket without triggering the lost-connection path.
  function closeSocket() {
    stopPing();
    S.wsGen++;
    const ws = S.ws;
    S.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'bye');
    setWsLabel('offline');
  }

  function onSocketLost(ev) {
    stopPing();
    S.ws = null;
    setWsLabel('closed');
    if (S.leavedWaiter) S.leavedWaiter();
    const wasIn = S.phase === 'in-room' || S.phase === 'reconnecting';
    if (S.phase === 'leaving' || S.phase === 'lobby') return;
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

  function startPing() {
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

  function stopPing() {
    if (S.pingTimer) clearInterval(S.pingTimer);
    S.pingTimer = null;
  }

  // ---------------------------------------------------------------- protocol

  function onServerMessage(msg) {
    switch (msg.type) {
      case 'joined': return onJoined(msg);
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
      default: return undefined; // unknown types are ignored
    }
  }

  // Highlights the tiles of whoever the server says is speaking now.
  function onSpeakers(msg) {
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

  function onJoined(msg) {
    const rejoined = S.reconnectAttempts > 0;
    S.phase = 'in-room';
    S.reconnectAttempts = 0;
    S.id = msg.id;
    S.room = msg.room;
    S.audio = msg.audio;
    S.iceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
    S.p2pTimeoutMs = Number.isFinite(msg.p2pTimeoutMs) ? msg.p2pTimeoutMs : 5000;
    S.gone.clear();
    setMode(msg.mode);
    clearNotice('ws');
    clearNotice('room');
    if (rejoined) notice('ws', 'info', 'Reconnected.');
    const url = new URL(location.href);
    url.search = `?room=${encodeURIComponent(S.room)}`;
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

  function onOtherJoin(msg) {
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

  function onBye(msg) {
    if (typeof msg.id !== 'string') return;
    S.gone.add(msg.id);
    removePeer(msg.id);
  }

  function onModeChange(msg) {
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

  function onError(msg) {
    const code = msg.code || 'error';
    notice(`error-${code}`, 'error', `Error ${code}: ${msg.message || 'no details'}`);
    // A failed join leaves us outside any room; a closed room puts us outside it.
    if ((msg.request === 'join' && S.phase !== 'in-room') || code === 'room-closed') backToLobby();
  }

  function onRelayed(msg) {
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

  function signal(to, data) {
    send({ type: 'message', room: S.room, to, data });
  }

  // ---------------------------------------------------------------- peers (P2P)

  function addPeer(id, name, { polite }) {
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
  function startP2p(peer) {
    peer.reportedFailed = false;
    peer.pc = createPc(peer);
    peer.p2pTimer = setTimeout(() => {
      if (peer.pc && peer.pc.connectionState !== 'connected') reportP2pFailed(peer);
    }, S.p2pTimeoutMs);
  }

  function removePeer(id) {
    const peer = S.peers.get(id);
    if (!peer) return;
    S.peers.delete(id);
    clearTimeout(peer.switchTimer);
    closePeerPc(peer);
    peer.sfuStream = null;
    peer.tile.remove();
    clearNotice(`peer-${id}`);
    updateLayout();
  }

  function closeAllPeers() {
    for (const id of [...S.peers.keys()]) removePeer(id);
  }

  // Ends the direct connection to `peer` (the tile stays).
  function closePeerPc(peer) {
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

  function setPeerName(peer, name) {
    if (typeof name !== 'string' || !name) return;
    peer.name = name;
    S.names.set(peer.id, name);
    peer.tile.querySelector('.name').textContent = name;
    peer.tile.querySelector('.avatar').textContent = initial(name);
  }

  function createPc(peer) {
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

  async function startCall(peer) {
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

  async function onPeerSignal(peer, data) {
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

  async function flushCandidates(peer) {
    const queued = peer.pending.splice(0);
    for (const c of queued) await addCandidate(peer.pc, c);
  }

  async function addCandidate(pc, data) {
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

  function reportP2pFailed(peer) {
    if (S.mode !== 'p2p' || peer.reportedFailed || !S.room) return;
    peer.reportedFailed = true;
    send({ type: 'p2p-failed', room: S.room, peer: peer.id });
    if (S.timing && !S.timing.p2pFailedAt) S.timing.p2pFailedAt = Date.now();
    notice(`peer-${peer.id}`, 'info', `The direct connection to ${peer.name || 'a participant'} did not work out; asking the server to carry the call.`);
  }

  // ---------------------------------------------------------------- server connection (SFU)

  // The room now goes via the server: open the one connection to the
  // server's peer "sfu" (or use the warm standby, already open). Make before
  // break: a direct connection that works keeps its media on screen until the
  // server delivers that participant (see setPeerMedia); one that does not
  // goes at once.
  function connectToSfu(reason) {
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
  function armSwitch(peer) {
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
  function watchServerReach() {
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

  function stopServerReachWatch() {
    if (S.reachTimer) clearTimeout(S.reachTimer);
    S.reachTimer = null;
  }

  function setServerReach(state) {
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

  function openSfu() {
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
    };
    S.sfu = sfu;
    if (S.localStream) for (const t of S.localStream.getTracks()) pc.addTrack(t, S.localStream);
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
    // The client always offers first, even with nothing to send but `chat`.
    sfuStep(sfu, () => sfuOffer(sfu));
  }

  // Runs one signaling step after the previous ones.
  function sfuStep(sfu, step) {
    sfu.chain = sfu.chain.then(() => (S.sfu === sfu && sfu.pc.signalingState !== 'closed' ? step() : undefined))
      .catch((e) => {
        console.warn('server connection signaling failed:', e);
        if (S.sfu === sfu) notice('sfu-conn', 'error', `Connecting to the server failed: ${e.message || e}`);
      });
  }

  async function sfuOffer(sfu) {
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

  function onSfuSignal(data) {
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

  async function flushSfuCandidates(sfu) {
    for (const c of sfu.pending.splice(0)) await addCandidate(sfu.pc, c);
  }

  function queueSfuSync(sfu) {
    if (sfu.syncQueued) return;
    sfu.syncQueued = true;
    queueMicrotask(() => { sfu.syncQueued = false; syncSfuTracks(sfu); });
  }

  // mid -> { owner, ssrcs } of every m-section in `sdp` that names a stream
  // (a=msid, or the older a=ssrc:N msid:), with the SSRCs it announces.
  function sdpStreams(sdp) {
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
  function syncSfuTracks(sfu) {
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
  }

  function setPeerMedia(peer, tracks) {
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

  function setMixAudio(tracks) {
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

  function closeSfu() {
    const sfu = S.sfu;
    if (!sfu) return;
    S.sfu = null;
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

  // ---------------------------------------------------------------- chat

  function wireChat(sfu, dc) {
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

  function chatReady() {
    return !!(S.sfu && S.sfu.chat && S.sfu.chat.readyState === 'open');
  }

  function updateChatState() {
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
  function updateChatVisibility() {
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

  function setChatOpen(open) {
    S.chatOpen = open;
    updateChatVisibility();
    if (open && !ui.chatInput.disabled) ui.chatInput.focus();
  }

  function sendChat() {
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

  function addChatMessage(from, text, mine) {
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
  function nameColor(id) {
    let h = 0;
    for (const c of id) h = (h * 31 + c.charCodeAt(0)) % 360;
    return `hsl(${h} 75% 72%)`;
  }

  function scrollChat(force) {
    if (force) ui.chatScroll.scrollTop = ui.chatScroll.scrollHeight;
  }

  function clearChat() {
    ui.chatLog.textContent = '';
    ui.chatEmpty.hidden = false;
    ui.chatInput.value = '';
    S.chatUnread = 0;
    S.chatOpen = null;
    updateChatVisibility();
    updateChatState();
  }

  // ---------------------------------------------------------------- tiles

  function makeTile(id, name) {
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
  function watchTrack(track, onChange) {
    if (watchedTracks.has(track)) return;
    watchedTracks.add(track);
    for (const ev of ['mute', 'unmute', 'ended']) track.addEventListener(ev, onChange);
  }

  function playMedia(el, onBlocked) {
    el.play().catch((e) => {
      if (e.name !== 'NotAllowedError') return;
      // Autoplay with sound was blocked: play muted and offer to unmute.
      el.muted = true;
      el.play().catch(() => {});
      onBlocked();
    });
  }

  function attachRemote(peer, stream) {
    const video = peer.tile.querySelector('video');
    if (video.srcObject !== stream) video.srcObject = stream;
    playMedia(video, () => { peer.tile.querySelector('.unmute').hidden = false; });
    refreshTile(peer);
  }

  // Shows the video, or the avatar while there is no live, unmuted video track.
  function refreshTile(peer) {
    const video = peer.tile.querySelector('video');
    const stream = video.srcObject;
    const live = !!stream && stream.getVideoTracks().some((t) => t.readyState === 'live' && !t.muted);
    peer.tile.classList.toggle('no-video', !live || video.readyState < 2);
    updatePeerState(peer);
  }

  function updatePeerState(peer) {
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

  // ---------------------------------------------------------------- join / leave

  async function join(room, name) {
    if (S.phase !== 'lobby') return;
    room = room.trim();
    name = name.trim().slice(0, 64);
    if (!ROOM_RE.test(room)) {
      notice('room', 'error', 'Room names use letters, digits, "_", "." and "-" only (up to 128).');
      return;
    }
    clearNotice('room');
    clearNotice('ws');
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

  async function leave() {
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

  function backToLobby() {
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

  // ---------------------------------------------------------------- wiring

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
    const link = `${location.origin}/?room=${encodeURIComponent(S.room || '')}`;
    try {
      await navigator.clipboard.writeText(link);
      notice('copy', 'info', 'Invite link copied.');
    } catch (_) {
      notice('copy', 'info', `Invite link: ${link}`, { sticky: true });
    }
  });
  window.addEventListener('pagehide', () => { if (S.ws) S.ws.close(1000, 'page closed'); });

  // Test hooks (kept small on purpose).
  async function inbound(pc, kind, owner) {
    const out = [];
    const report = await pc.getStats();
    report.forEach((r) => {
      if (r.type !== 'inbound-rtp' || r.kind !== kind) return;
      const peer = owner(r);
      if (peer) out.push({ peer, mid: r.mid ?? null, ssrc: r.ssrc, packetsReceived: r.packetsReceived || 0, ...(kind === 'video' ? { framesDecoded: r.framesDecoded || 0 } : {}) });
    });
    return out;
  }

  // Inbound stats of the server connection, attributed by mid to the
  // publishing participant (or "mix"); streams no longer received are left out.
  function sfuOwner(r) {
    const sfu = S.sfu;
    if (!sfu) return null;
    let entry = r.mid != null ? sfu.remote.get(String(r.mid)) : null;
    if (!entry && r.trackIdentifier) {
      entry = [...sfu.remote.values()].find((x) => x.track.id === r.trackIdentifier) || null;
    }
    // An m-section reused for a later track: stats of the earlier SSRC are not the new owner's.
    if (entry && entry.ssrcs.size && !entry.ssrcs.has(r.ssrc)) return null;
    return entry ? entry.owner : null;
  }

  async function mediaStats(kind) {
    const out = [];
    for (const p of S.peers.values()) {
      if (p.pc) out.push(...(await inbound(p.pc, kind, () => p.id)).map((x) => ({ ...x, via: 'p2p' })));
    }
    if (S.sfu) out.push(...(await inbound(S.sfu.pc, kind, sfuOwner)).map((x) => ({ ...x, via: 'sfu' })));
    return out;
  }

  // ---------------------------------------------------------------- timings (tests)

  function newPeerTiming() {
    return {
      knownAt: Date.now(), firstP2pFrameAt: null, firstSfuFrameAt: null,
      counts: { p2p: 0, sfu: 0 }, // framesDecoded at the last sample, per path
      shown: [], // epoch ms of each sample where the frames on screen advanced
    };
  }

  // Every TIMING_SAMPLE_MS: which path's frames are on each tile, and whether
  // they advanced. Resolution is the sampling period.
  async function sampleTimings() {
    const t = S.timing;
    if (!t || S.phase !== 'in-room') return;
    const stats = await mediaStats('video').catch(() => []);
    const now = Date.now();
    for (const peer of S.peers.values()) {
      let pt = t.peers.get(peer.id);
      if (!pt) { pt = newPeerTiming(); t.peers.set(peer.id, pt); }
      const sum = (via) => stats.filter((x) => x.peer === peer.id && x.via === via).reduce((n, x) => n + x.framesDecoded, 0);
      const counts = { p2p: sum('p2p'), sfu: sum('sfu') };
      if (counts.p2p > 0 && !pt.firstP2pFrameAt) pt.firstP2pFrameAt = now;
      if (counts.sfu > 0 && !pt.firstSfuFrameAt) pt.firstSfuFrameAt = now;
      const video = peer.tile.querySelector('video');
      const via = peer.sfuStream && video.srcObject === peer.sfuStream ? 'sfu' : 'p2p';
      if (video.srcObject && counts[via] > pt.counts[via]) {
        pt.shown.push(now);
        if (pt.shown.length > TIMING_MAX_FRAMES) pt.shown.shift();
      }
      pt.counts = counts;
    }
  }

  function startTimings() {
    if (S.timing) return;
    S.timing = { joinedAt: null, p2pFailedAt: null, modeAt: null, modeReason: null, peers: new Map() };
    const loop = () => sampleTimings().finally(() => setTimeout(loop, TIMING_SAMPLE_MS));
    loop();
  }

  window.sb = {
    // Epoch-ms timings (needs `?timings=1`): joinedAt, p2pFailedAt (we sent
    // p2p-failed, or heard `mode` p2p-failed), modeAt/modeReason (last
    // `mode`), and per remote: knownAt, firstP2pFrameAt, firstSfuFrameAt,
    // switchedBy (server-delivered | p2p-down | timeout: why make-before-break
    // closed the direct connection).
    timings() {
      const t = S.timing;
      if (!t) return null;
      return {
        joinedAt: t.joinedAt, p2pFailedAt: t.p2pFailedAt, modeAt: t.modeAt, modeReason: t.modeReason,
        standby: S.standby, serverReach: S.serverReach,
        peers: [...S.peers.values()].map((p) => {
          const pt = t.peers.get(p.id) || newPeerTiming();
          return {
            id: p.id, name: p.name, knownAt: pt.knownAt, firstP2pFrameAt: pt.firstP2pFrameAt, firstSfuFrameAt: pt.firstSfuFrameAt,
            // Why a working direct connection was closed on the switch to the server.
            switchedBy: p.switchedBy || null,
          };
        }),
      };
    },
    // Per remote: the longest time between two advances of the frames on its
    // tile from `since` (epoch ms) until now, counting the wait after the last one.
    longestFreeze(since) {
      const t = S.timing;
      if (!t) return null;
      const now = Date.now();
      return [...S.peers.values()].map((p) => {
        const shown = (t.peers.get(p.id) || { shown: [] }).shown;
        let prev = null;
        let longest = 0;
        let frames = 0;
        for (const at of shown) {
          if (at < since) { prev = at; continue; }
          frames++;
          if (prev !== null) longest = Math.max(longest, at - prev);
          prev = at;
        }
        if (prev !== null) longest = Math.max(longest, now - prev);
        return { id: p.id, name: p.name, longestFreezeMs: prev === null ? null : longest, frames };
      });
    },
    state() {
      const ws = S.ws ? ['connecting', 'open', 'closing', 'closed'][S.ws.readyState] : 'closed';
      const sfu = S.sfu;
      return {
        id: S.id, room: S.room, mode: S.mode, audio: S.audio, ws,
        speakers: S.speakers.map((x) => x.id), speakerEvents: S.speakerEvents,
        speaking: [...document.querySelectorAll('.tile.speaking')].map((t) => (t === ui.localTile ? S.id : t.dataset.peer)),
        peers: [...S.peers.values()].map((p) => ({
          id: p.id, name: p.name, connectionState: p.pc ? p.pc.connectionState : 'none',
          sfuTracks: p.sfuStream ? p.sfuStream.getTracks().map((t) => t.kind) : [],
        })),
        sfu: sfu ? {
          connectionState: sfu.pc.connectionState,
          iceConnectionState: sfu.pc.iceConnectionState,
          signalingState: sfu.pc.signalingState,
          chat: sfu.chat ? sfu.chat.readyState : 'none',
          serverReach: S.serverReach,
          remote: [...sfu.remote.entries()].map(([mid, r]) => ({
            mid, owner: r.owner, kind: r.kind, muted: r.track.muted,
          })),
        } : null,
      };
    },
    // Inbound video per remote participant: { peer, via, mid, ssrc, framesDecoded, packetsReceived }.
    videoStats() { return mediaStats('video'); },
    // Inbound audio per remote participant (or "mix"): { peer, via, mid, ssrc, packetsReceived }.
    audioStats() { return mediaStats('audio'); },
  };

  // Start: room (and name) from the URL; both present means join right away.
  const params = new URLSearchParams(location.search);
  const urlRoom = params.get('room') || '';
  const urlName = params.get('name') || '';
  // Optional settings for the join that creates the room (ignored otherwise).
  const urlMode = params.get('mode');
  const urlAudio = params.get('audio');
  if (['auto', 'p2p', 'sfu'].includes(urlMode)) S.joinMode = urlMode;
  if (['mix', 'forward'].includes(urlAudio)) S.joinAudio = urlAudio;
  if (params.get('standby') === '0') S.standby = false;
  if (params.get('timings') === '1') startTimings();
  let savedName = '';
  try { savedName = localStorage.getItem('switchboard.name') || ''; } catch (_) { /* private mode */ }
  ui.room.value = urlRoom;
  ui.name.value = urlName || savedName;
  updateLocalControls();
  showLobby();
  if (urlRoom && urlName) join(urlRoom, urlName);
  else (urlRoom ? ui.name : ui.room).focus();
})();
