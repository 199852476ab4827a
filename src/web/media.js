// The local camera and microphone, and their mute buttons.

import { S, ui } from './state.js';
import { notice } from './notices.js';

export function describeMediaError(e) {
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

export async function startLocalMedia() {
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

export function stopLocalMedia() {
  if (S.localStream) for (const t of S.localStream.getTracks()) t.stop();
  S.localStream = null;
  ui.localVideo.srcObject = null;
}

export function updateLocalControls() {
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

export function setToggle(button, track, onLabel, offLabel, onTitle, offTitle, missing) {
  const label = button.querySelector('.label');
  button.disabled = !track;
  const off = !!track && !track.enabled;
  button.setAttribute('aria-pressed', String(off));
  button.classList.toggle('off', off || !track);
  label.textContent = !track ? missing : off ? offLabel : onLabel;
  button.title = !track ? missing : off ? offTitle : onTitle;
}

export function toggleTrack(kind) {
  if (!S.localStream) return;
  const tracks = kind === 'audio' ? S.localStream.getAudioTracks() : S.localStream.getVideoTracks();
  for (const t of tracks) t.enabled = !t.enabled;
  updateLocalControls();
}
