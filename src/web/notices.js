// Banners at the top of the page: errors and info notices.

import { ui } from './state.js';

// Shows a banner. Same `key` replaces the previous one. Errors stay until
// dismissed or replaced; info notices fade after a while unless sticky.
export function notice(key, kind, text, { sticky = false } = {}) {
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
export function clearNotice(key) {
  for (const el of ui.notices.querySelectorAll('.notice')) if (el.dataset.key === key) el.remove();
}
