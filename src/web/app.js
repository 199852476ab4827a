// Switchboard browser client: signaling protocol v1 over one WebSocket at /ws,
// P2P calls between participants. Plain JS, no build step, no external URLs.
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
  };

  const PING_INTERVAL_MS = 20000;
  const LEAVE_TIMEOUT_MS = 3000;
  const RECONNECT_MAX_ATTEMPTS = 6;
  const ROOM_RE = /^[A-Za-z0-9_.-]{1,128}$/;

  // Everything the client knows. `phase`: lobby | joining | in-room | reconnecting | leaving.
  const S = {
    phase: 'lobby',
    ws: null, wsGen: 0, wsLabel: 'offline',
    id: null, room: null, name: '', mode: null, audio: null,
    iceServers: [], p2pTimeoutMs: 5000,
    peers: new Map(), // id -> peer (see addPeer)
    localStream: null,
    pingTimer: null, pingSeq: 0, lastPong: 0,
    reconnectAttempts: 0, reconnectTimer: null,
    leavedWaiter: null,
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
    ui.modeBadge.hidden = !mode;
    ui.modeBadge.dataset.mode = mode || '';
    ui.modeBadge.textContent = mode === 'sfu' ? 'via server' : mode === 'p2p' ? 'P2P' : '';
    ui.modeBadge.title = mode === 'sfu' ? 'Media is routed through the server'
      : 'Media flows directly between participants';
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
  }

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
      send({ type: 'join', room: S.room, name: S.name });
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
      case 'bye': return removePeer(msg.id);
      case 'leaved': if (S.leavedWaiter) S.leavedWaiter(); return undefined;
      case 'full':
        notice('room', 'error', `Room "${msg.room || S.room}" is full.`);
        return backToLobby();
      case 'message': return onRelayed(msg);
      case 'mode': return onModeChange(msg);
      case 'error': return onError(msg);
      case 'pong': S.lastPong = Date.now(); return undefined;
      case 'speakers': return undefined; // SFU rooms; used by a later version
      default: return undefined; // unknown types are ignored
    }
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
    setMode(msg.mode);
    clearNotice('ws');
    clearNotice('room');
    if (rejoined) notice('ws', 'info', 'Reconnected.');
    const url = new URL(location.href);
    url.search = `?room=${encodeURIComponent(S.room)}`;
    history.replaceState(null, '', url);
    showCall();
    // The newcomer waits for the offers of those already here.
    for (const p of Array.isArray(msg.peers) ? msg.peers : []) addPeer(p.id, p.name, { polite: true });
    if (S.mode === 'sfu') connectToSfu();
    updateLayout();
  }

  function onOtherJoin(msg) {
    if (!msg.id || msg.id === S.id) return;
    removePeer(msg.id);
    const peer = addPeer(msg.id, msg.name, { polite: false });
    // The participant already in the room makes the offer; never in an SFU room.
    if (peer.pc) startCall(peer);
  }

  function onModeChange(msg) {
    const before = S.mode;
    setMode(msg.mode);
    if (msg.mode === 'sfu' && before !== 'sfu') {
      for (const peer of S.peers.values()) clearTimeout(peer.p2pTimer);
      connectToSfu(msg.reason);
    } else if (msg.mode === 'p2p') {
      clearNotice('sfu');
    }
  }

  function onError(msg) {
    const code = msg.code || 'error';
    notice(`error-${code}`, 'error', `Error ${code}: ${msg.message || 'no details'}`);
    // A failed join leaves us outside any room; a closed room puts us outside it.
    if ((msg.request === 'join' && S.phase !== 'in-room') || code === 'room-closed') backToLobby();
  }

  // SFU media arrives in a later version: this is where the client will open its
  // one RTCPeerConnection to the reserved peer "sfu" (offer as message to:"sfu").
  // Until then existing P2P connections stay up.
  function connectToSfu(reason) {
    const why = reason === 'third-participant' ? 'A third person joined, so this call now goes via the server. '
      : reason === 'p2p-failed' ? 'A direct connection failed, so this call now goes via the server. '
        : 'This call goes via the server. ';
    notice('sfu', 'info', `${why}Server media arrives in a later version of Switchboard; `
      + 'direct connections stay up meanwhile.', { sticky: true });
    for (const peer of S.peers.values()) updatePeerState(peer);
  }

  function onSfuSignal(_data) { /* later: answers/offers/candidates from the server's peer */ }

  function onRelayed(msg) {
    const from = msg.from;
    const data = msg.data;
    if (!data || typeof data !== 'object' || typeof from !== 'string') return;
    if (from === 'sfu') { onSfuSignal(data); return; }
    let peer = S.peers.get(from);
    if (!peer) {
      // An offer from someone we were not told about: accept it rather than drop the call.
      if (data.type !== 'offer' || S.mode === 'sfu') return;
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
    const peer = {
      id, name: typeof name === 'string' ? name : '', polite,
      pc: null, pending: [], chain: Promise.resolve(), stream: null,
      p2pTimer: null, reportedFailed: false, tile: makeTile(id, name),
    };
    S.peers.set(id, peer);
    if (S.mode !== 'sfu') {
      peer.pc = createPc(peer);
      peer.p2pTimer = setTimeout(() => {
        if (peer.pc && peer.pc.connectionState !== 'connected') reportP2pFailed(peer);
      }, S.p2pTimeoutMs);
    }
    updatePeerState(peer);
    updateLayout();
    return peer;
  }

  function removePeer(id) {
    const peer = S.peers.get(id);
    if (!peer) return;
    S.peers.delete(id);
    clearTimeout(peer.p2pTimer);
    if (peer.pc) { peer.pc.onconnectionstatechange = null; peer.pc.close(); }
    peer.tile.remove();
    clearNotice(`peer-${id}`);
    updateLayout();
  }

  function closeAllPeers() {
    for (const id of [...S.peers.keys()]) removePeer(id);
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
    notice(`peer-${peer.id}`, 'info', `The direct connection to ${peer.name || 'a participant'} did not work out; asking the server to carry the call.`);
  }

  // ---------------------------------------------------------------- tiles

  function makeTile(id, name) {
    const tile = ui.template.content.firstElementChild.cloneNode(true);
    tile.dataset.peer = id;
    tile.classList.add('no-video');
    tile.querySelector('.name').textContent = name || 'Guest';
    tile.querySelector('.avatar').textContent = initial(name);
    const video = tile.querySelector('video');
    video.addEventListener('loadeddata', () => tile.classList.remove('no-video'));
    const unmute = tile.querySelector('.unmute');
    unmute.addEventListener('click', () => {
      video.muted = false;
      video.play().catch(() => {});
      unmute.hidden = true;
    });
    ui.tiles.append(tile);
    return tile;
  }

  function attachRemote(peer, stream) {
    const video = peer.tile.querySelector('video');
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch((e) => {
      if (e.name !== 'NotAllowedError') return;
      // Autoplay with sound was blocked: play muted and offer to unmute.
      video.muted = true;
      video.play().catch(() => {});
      peer.tile.querySelector('.unmute').hidden = false;
    });
  }

  function updatePeerState(peer) {
    const el = peer.tile.querySelector('.pc-state');
    const state = peer.pc ? peer.pc.connectionState : 'via-server';
    el.dataset.state = state;
    el.textContent = peer.pc ? state : 'via server';
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
    closeSocket();
    stopLocalMedia();
    clearNotice('sfu');
    S.id = null;
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
  window.sb = {
    state() {
      const ws = S.ws ? ['connecting', 'open', 'closing', 'closed'][S.ws.readyState] : 'closed';
      return {
        id: S.id, room: S.room, mode: S.mode, ws,
        peers: [...S.peers.values()].map((p) => ({
          id: p.id, name: p.name, connectionState: p.pc ? p.pc.connectionState : 'none',
        })),
      };
    },
    async videoStats() {
      const out = [];
      for (const p of S.peers.values()) {
        if (!p.pc) continue;
        const report = await p.pc.getStats();
        report.forEach((r) => {
          if (r.type === 'inbound-rtp' && r.kind === 'video') {
            out.push({ peer: p.id, framesDecoded: r.framesDecoded || 0, packetsReceived: r.packetsReceived || 0 });
          }
        });
      }
      return out;
    },
  };

  // Start: room (and name) from the URL; both present means join right away.
  const params = new URLSearchParams(location.search);
  const urlRoom = params.get('room') || '';
  const urlName = params.get('name') || '';
  let savedName = '';
  try { savedName = localStorage.getItem('switchboard.name') || ''; } catch (_) { /* private mode */ }
  ui.room.value = urlRoom;
  ui.name.value = urlName || savedName;
  updateLocalControls();
  showLobby();
  if (urlRoom && urlName) join(urlRoom, urlName);
  else (urlRoom ? ui.name : ui.room).focus();
})();
