// NixOS control panel: small page helpers (plain ES2020, no dependencies).
(() => {
  'use strict';

  const pad = (n) => String(n).padStart(2, '0');

  /** "2m 05s", "1h 02m", "12s" from milliseconds. */
  function formatDuration(ms) {
    if (!Number.isFinite(ms) || ms < 0) ms = 0;
    let s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (h) return `${h}h ${pad(m)}m ${pad(s)}s`;
    if (m) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  /** Local "YYYY-MM-DD HH:MM:SS" from an ISO 8601 string ('' if none). */
  function formatTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function formatBytes(n) {
    n = Number(n) || 0;
    const units = ['bytes', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} ${n === 1 ? 'byte' : 'bytes'}` : `${n.toFixed(1)} ${units[i]}`;
  }

  /** Rewrite every .js-duration (data-start, optional data-end; running ones tick). */
  function refreshDurations(root = document) {
    const now = Date.now();
    for (const el of root.querySelectorAll('.js-duration[data-start]')) {
      const start = Date.parse(el.dataset.start);
      if (Number.isNaN(start)) continue;
      const end = el.dataset.end ? Date.parse(el.dataset.end) : now;
      const text = formatDuration(end - start);
      if (el.textContent !== text) el.textContent = text;
      el.classList.toggle('running', !el.dataset.end);
    }
  }

  /** Absolute times in the viewer's own time zone. */
  function localizeTimes(root = document) {
    for (const el of root.querySelectorAll('time.js-abs[datetime]')) {
      const text = formatTime(el.getAttribute('datetime'));
      if (text) {
        el.textContent = text;
        el.title = new Date(el.getAttribute('datetime')).toString();
      }
    }
  }

  /** "3 min ago", "2h 05m ago", "4 days ago" for time.js-rel (server text stays as the fallback). */
  function formatRelative(iso, now = Date.now()) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return '';
    const s = Math.max(0, Math.round((now - t) / 1000));
    if (s < 10) return 'just now';
    if (s < 60) return `${s}s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h}h ${pad(m % 60)}m ago`;
    const d = Math.floor(h / 24);
    if (d < 60) return `${d} day${d === 1 ? '' : 's'} ago`;
    return formatTime(iso).slice(0, 10);
  }

  function refreshRelative(root = document) {
    const now = Date.now();
    for (const el of root.querySelectorAll('time.js-rel[datetime]')) {
      const iso = el.getAttribute('datetime');
      const text = formatRelative(iso, now);
      if (text && el.textContent !== text) el.textContent = text;
      if (!el.title) el.title = formatTime(iso);
    }
  }

  /** The deploy form: show the description of the selected action. */
  function wireActionHelp() {
    const form = document.getElementById('deploy-form');
    if (!form) return;
    const select = form.querySelector('select[name=action]');
    const help = form.querySelectorAll('[data-help-for]');
    if (!select || !help.length) return;
    const update = () => {
      for (const el of help) el.hidden = el.dataset.helpFor !== select.value;
    };
    select.addEventListener('change', update);
    update();
  }

  /** Forms with data-confirm ask first (used for nothing one-click-critical). */
  function wireConfirms() {
    document.addEventListener('submit', (ev) => {
      const msg = ev.target instanceof HTMLFormElement ? ev.target.dataset.confirm : null;
      if (msg && !window.confirm(msg)) ev.preventDefault();
    });
  }

  /** A submitted form's buttons are disabled to avoid double posts. */
  function wireSubmitOnce() {
    document.addEventListener('submit', (ev) => {
      const form = ev.target;
      if (!(form instanceof HTMLFormElement) || ev.defaultPrevented) return;
      if ((form.method || '').toLowerCase() !== 'post') return;
      // After the event: disabling synchronously would drop the button's own name/value.
      setTimeout(() => {
        for (const b of form.querySelectorAll('button[type=submit]:not([disabled]), button:not([type]):not([disabled])')) {
          b.disabled = true;
          b.dataset.submitting = '1';
        }
      }, 0);
    });
    // Coming back through the history cache: re-enable.
    window.addEventListener('pageshow', (ev) => {
      if (!ev.persisted) return;
      for (const b of document.querySelectorAll('button[data-submitting]')) {
        b.disabled = false;
        delete b.dataset.submitting;
      }
    });
  }

  window.panel = { formatDuration, formatTime, formatRelative, formatBytes, refreshDurations, refreshRelative, localizeTimes };

  localizeTimes();
  refreshDurations();
  refreshRelative();
  setInterval(() => refreshDurations(), 1000);
  setInterval(() => refreshRelative(), 15000);
  wireActionHelp();
  wireConfirms();
  wireSubmitOnce();
})();
