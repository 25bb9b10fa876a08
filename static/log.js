// Live deployment log: WebSocket follower with resume, dedupe, ANSI colours
// and a capped DOM.  Plain ES2020; never puts log text into innerHTML.
(() => {
  'use strict';

  const logEl = document.getElementById('log');
  if (!logEl || !logEl.dataset.ws) return;

  const MAX_LINES = 5000;
  const BACKOFF_MIN = 500;
  const BACKOFF_MAX = 5000;
  const PING_EVERY = 25000;
  // Rendered into the page from Deployment.TERMINAL: one definition of which statuses are final.
  const TERMINAL = new Set(JSON.parse(document.getElementById('terminal-statuses').textContent));
  const DENIED_CODES = new Set([4403, 4404]);
  const utf8 = new TextDecoder();
  const INFLATE = typeof DecompressionStream === 'function';
  // A zlib stream (the server's `compress=deflate` frames) to its bytes.
  const inflate = (buf) =>
    new Response(new Blob([buf]).stream().pipeThrough(new DecompressionStream('deflate'))).arrayBuffer();
  const STATE_LABELS = {
    connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', complete: 'complete', denied: 'no access',
  };

  const $ = (id) => document.getElementById(id);
  const connEl = $('log-conn');
  const shownEl = $('log-shown');
  const jumpEl = $('log-jump');
  const truncEl = $('log-truncated');
  const followBox = $('log-follow');
  const wrapBox = $('log-wrap');
  const baseTitle = document.title;

  // Public, for tests and the curious.
  const state = {
    lastSeq: -1, // highest sequence number received
    lineCount: 0, // line elements in the DOM
    received: 0, // lines received (after dedupe)
    dropped: 0, // lines removed from the DOM by the cap
    duplicates: 0, // lines ignored as already seen
    state: 'connecting',
    status: null,
    ended: false,
    following: true,
    connects: 0,
  };
  window.panelLog = state;

  let ws = null;
  let attempt = 0;
  let reconnectTimer = null;
  let pingTimer = null;
  let pending = [];
  let rafPending = false;
  let placeholder = null;

  // ---- connection indicator ----------------------------------------------

  function setConn(name, detail) {
    state.state = name;
    document.body.dataset.logState = name;
    if (connEl) {
      connEl.dataset.state = name;
      const label = connEl.querySelector('.conn-label');
      if (label) label.textContent = detail || STATE_LABELS[name] || name;
    }
  }

  // ---- ANSI SGR ------------------------------------------------------------

  const ESC = '\x1b';
  // C0 controls other than TAB and ESC are dropped from display.
  const CONTROLS = /[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f]/g;

  /** Split one line into [{text, fg, bold}] segments; strips OSC and non-SGR escapes. */
  function parseAnsi(text) {
    const out = [];
    let fg = null;
    let bold = false;
    let buf = '';
    const emit = () => {
      if (buf) out.push({ text: buf, fg, bold });
      buf = '';
    };
    let i = 0;
    const n = text.length;
    while (i < n) {
      const ch = text[i];
      if (ch !== ESC && ch !== '\x9b') {
        buf += ch;
        i++;
        continue;
      }
      const next = ch === '\x9b' ? '[' : text[i + 1];
      const start = ch === '\x9b' ? i + 1 : i + 2;
      if (next === '[') {
        // CSI: parameters 0x30-0x3F, intermediates 0x20-0x2F, final 0x40-0x7E.
        let j = start;
        while (j < n && text.charCodeAt(j) >= 0x30 && text.charCodeAt(j) <= 0x3f) j++;
        const params = text.slice(start, j);
        while (j < n && text.charCodeAt(j) >= 0x20 && text.charCodeAt(j) <= 0x2f) j++;
        if (j >= n) { i = n; break; } // truncated sequence: drop it
        const final = text[j];
        i = j + 1;
        if (final !== 'm' || /[^0-9;:]/.test(params)) continue; // not SGR (or private): ignore
        emit();
        const codes = params === '' ? [0] : params.split(/[;:]/).map((p) => (p === '' ? 0 : parseInt(p, 10)));
        for (let k = 0; k < codes.length; k++) {
          const c = codes[k];
          if (c === 0) { fg = null; bold = false; }
          else if (c === 1) bold = true;
          else if (c === 22) bold = false;
          else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) fg = c;
          else if (c === 39) fg = null;
          else if (c === 38 || c === 48 || c === 58) {
            // Extended colour: skip its arguments (5;n or 2;r;g;b), keep the current colour.
            if (codes[k + 1] === 5) k += 2;
            else if (codes[k + 1] === 2) k += 4;
          }
        }
      } else if (next === ']') {
        // OSC: up to BEL or ST (ESC \).
        let j = start;
        while (j < n && text[j] !== '\x07' && !(text[j] === ESC && text[j + 1] === '\\')) j++;
        i = j >= n ? n : text[j] === '\x07' ? j + 1 : j + 2;
      } else if (next === 'P' || next === 'X' || next === '^' || next === '_') {
        // DCS/SOS/PM/APC strings: up to ST.
        let j = start;
        while (j < n && !(text[j] === ESC && text[j + 1] === '\\')) j++;
        i = j >= n ? n : j + 2;
      } else if (next === '(' || next === ')' || next === '#' || next === '%') {
        i = start + 1; // charset selection etc.: one more byte
      } else {
        i = next === undefined ? n : start; // two-byte escape
      }
    }
    emit();
    return out;
  }

  function renderLine(seq, stream, text) {
    const el = document.createElement('div');
    el.className = stream === 'e' ? 'ln err' : stream === 's' ? 'ln sys' : 'ln';
    el.dataset.seq = String(seq);
    text = typeof text === 'string' ? text : String(text ?? '');
    if (text.indexOf(ESC) === -1 && text.indexOf('\x9b') === -1) {
      el.textContent = text.replace(CONTROLS, '');
      return el;
    }
    for (const seg of parseAnsi(text)) {
      const t = seg.text.replace(CONTROLS, '');
      if (!t) continue;
      if (seg.fg === null && !seg.bold) {
        el.appendChild(document.createTextNode(t));
      } else {
        const span = document.createElement('span');
        span.className = (seg.fg !== null ? `ansi-${seg.fg}` : '') + (seg.bold ? ' ansi-bold' : '');
        span.textContent = t;
        el.appendChild(span);
      }
    }
    return el;
  }

  // ---- appending -----------------------------------------------------------

  function setPlaceholder(text) {
    if (state.lineCount > 0) return;
    if (!placeholder) {
      placeholder = document.createElement('div');
      placeholder.className = 'log-empty';
      logEl.appendChild(placeholder);
    }
    placeholder.textContent = text;
  }

  function removePlaceholder() {
    if (placeholder) {
      placeholder.remove();
      placeholder = null;
    }
  }

  function atBottom() {
    return logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 24;
  }

  function scrollToBottom() {
    logEl.scrollTop = logEl.scrollHeight;
  }

  function setFollowing(on) {
    state.following = on;
    if (followBox) followBox.checked = on;
    if (jumpEl) jumpEl.hidden = on;
  }

  function receiveLines(lines) {
    if (!Array.isArray(lines)) return;
    for (const line of lines) {
      if (!Array.isArray(line)) continue;
      const seq = Number(line[0]);
      if (!Number.isFinite(seq)) continue;
      if (seq <= state.lastSeq) {
        state.duplicates++;
        continue;
      }
      state.lastSeq = seq;
      state.received++;
      pending.push(line);
    }
    if (pending.length && !rafPending) {
      rafPending = true;
      requestAnimationFrame(flush);
    }
    // The recorded counts arrive with the final status; until then show what has streamed.
    if (!TERMINAL.has(state.status)) {
      const countEl = document.getElementById('line-count');
      if (countEl) countEl.textContent = (state.lastSeq + 1).toLocaleString();
    }
  }

  function trim() {
    const excess = state.lineCount - MAX_LINES;
    if (excess <= 0) return;
    const follow = state.following;
    const before = logEl.scrollHeight;
    const first = logEl.firstElementChild;
    const last = logEl.children[excess - 1];
    if (first && last) {
      const range = document.createRange();
      range.setStartBefore(first);
      range.setEndAfter(last);
      range.deleteContents();
    }
    state.lineCount -= excess;
    state.dropped += excess;
    if (!follow) logEl.scrollTop -= before - logEl.scrollHeight; // keep the reader's place
  }

  function flush() {
    rafPending = false;
    if (!pending.length) return;
    let batch = pending;
    pending = [];
    const follow = state.following;
    if (batch.length > MAX_LINES) {
      // A big replay: only the newest MAX_LINES can be shown anyway.
      state.dropped += batch.length - MAX_LINES;
      batch = batch.slice(-MAX_LINES);
      if (state.lineCount) {
        state.dropped += state.lineCount;
        logEl.replaceChildren();
        state.lineCount = 0;
      }
    }
    removePlaceholder();
    const frag = document.createDocumentFragment();
    for (const [seq, stream, text] of batch) frag.appendChild(renderLine(seq, stream, text));
    logEl.appendChild(frag);
    state.lineCount += batch.length;
    trim();
    if (truncEl && state.dropped > 0) truncEl.hidden = false;
    if (shownEl) shownEl.textContent = state.lineCount.toLocaleString();
    if (follow) scrollToBottom();
  }

  function panelNote(text) {
    // A note from this page (not from the log): styled like panel lines, no seq.
    removePlaceholder();
    const el = document.createElement('div');
    el.className = 'ln sys note';
    el.textContent = text;
    logEl.appendChild(el);
    if (state.following) scrollToBottom();
  }

  // ---- status ----------------------------------------------------------------

  function setField(name, value) {
    for (const el of document.querySelectorAll(`[data-field="${name}"]`)) {
      switch (name) {
        case 'exit_code':
          el.textContent = value === null || value === undefined ? '—' : String(value);
          break;
        case 'generation_before':
        case 'generation_after':
          el.textContent = value === null || value === undefined ? '?' : String(value);
          break;
        case 'byte_count':
          el.dataset.bytes = String(value ?? 0);
          el.textContent = window.panel ? window.panel.formatBytes(value) : String(value ?? 0);
          break;
        case 'line_count':
          el.textContent = String(value ?? 0);
          break;
        case 'created_at':
        case 'started_at':
        case 'finished_at':
          if (value) {
            el.setAttribute('datetime', value);
            el.textContent = window.panel ? window.panel.formatTime(value) : value;
            el.title = new Date(value).toString();
          } else {
            el.removeAttribute('datetime');
            el.textContent = '—';
          }
          break;
        case 'error_message':
          el.textContent = value || '';
          break;
        default:
          el.textContent = value === null || value === undefined || value === '' ? '—' : String(value);
      }
    }
  }

  function applyStatus(s) {
    if (!s || typeof s !== 'object' || !s.status) return;
    state.status = s.status;
    document.body.dataset.deploymentStatus = s.status;
    const terminal = TERMINAL.has(s.status);

    const badge = $('status');
    if (badge) {
      badge.className = `badge badge-${s.status}`;
      badge.dataset.status = s.status;
      const label = badge.querySelector('.badge-label');
      if (label) label.textContent = s.status_label || s.status;
    }
    for (const key of Object.keys(s)) {
      if (key !== 'type' && key !== 'status') setField(key, s[key]);
    }

    const errorBox = $('error-box');
    if (errorBox) errorBox.hidden = !s.error_message;

    // Lines the log writer could not store (a long database outage): said, never silent.
    const gapBox = $('log-incomplete');
    const gapList = $('log-gaps');
    if (gapBox && gapList && Array.isArray(s.log_gaps)) {
      gapBox.hidden = s.log_gaps.length === 0;
      gapList.replaceChildren(...s.log_gaps.map((g) => {
        const li = document.createElement('li');
        li.textContent = `${g.lines} line${g.lines === 1 ? '' : 's'} lost after line ${g.after_seq}: ${g.reason}`;
        return li;
      }));
    }

    const duration = $('duration');
    if (duration) {
      if (s.started_at) {
        let span = duration.querySelector('.js-duration');
        if (!span) {
          span = document.createElement('span');
          span.className = 'js-duration';
          duration.replaceChildren(span);
        }
        span.dataset.start = s.started_at;
        if (s.finished_at) span.dataset.end = s.finished_at;
        else delete span.dataset.end;
        if (window.panel) window.panel.refreshDurations(duration);
      } else {
        duration.textContent = '—';
      }
    }

    const cancelForm = $('cancel-form');
    const cancelNote = $('cancel-note');
    if (terminal) {
      // A difference being built when the page was rendered: show it (and its confirm button) now.
      if ($('diff-pending')) location.reload();
      if (cancelForm) cancelForm.hidden = true;
      if (cancelNote) cancelNote.hidden = true;
    } else if (s.cancel_requested) {
      if (cancelNote) cancelNote.hidden = false;
      const btn = $('cancel-button');
      if (btn) btn.disabled = true;
    }
    document.title = `${s.status_label || s.status} · ${baseTitle}`;
  }

  // ---- WebSocket -------------------------------------------------------------

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    // First connection: only the lines the page keeps; the full log is a download.
    const tail = state.lastSeq < 0 ? `&tail=${MAX_LINES}` : '';
    // `lines` compressed (zlib, once on the server for every viewer) where the browser can inflate them.
    const compress = INFLATE ? '&compress=deflate' : '';
    return `${scheme}://${location.host}${logEl.dataset.ws}?after=${state.lastSeq}${tail}${compress}`;
  }

  function stopPing() {
    if (pingTimer) clearInterval(pingTimer);
    pingTimer = null;
  }

  function connect() {
    reconnectTimer = null;
    if (state.ended || state.state === 'denied') return;
    let opened = false;
    let sock;
    try {
      sock = new WebSocket(wsUrl());
      // `lines` messages come as binary frames of UTF-8 JSON (encoded once on the server for every viewer).
      sock.binaryType = 'arraybuffer';
    } catch (err) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    state.connects++;
    sock.onopen = () => {
      opened = true;
      setConn('live');
      stopPing();
      pingTimer = setInterval(() => {
        if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ type: 'ping' }));
      }, PING_EVERY);
    };
    // Inflating is asynchronous: every message goes through one chain, so they are handled in order.
    let inbox = Promise.resolve();
    sock.onmessage = (ev) => {
      inbox = inbox.then(() => decode(ev.data)).then(
        (msg) => handle(msg),
        () => {},
      );
    };
    const decode = async (data) => {
      if (typeof data === 'string') return JSON.parse(data);
      const bytes = INFLATE ? await inflate(data) : data;
      return JSON.parse(utf8.decode(bytes));
    };
    const handle = (msg) => {
      if (!msg || typeof msg !== 'object') return;
      attempt = 0; // the server is talking: a later drop starts the backoff afresh
      if (msg.type === 'lines') {
        receiveLines(msg.lines);
      } else if (msg.type === 'skipped') {
        // The server started at the tail: the earlier lines are only in the download.
        state.dropped += Number(msg.count) || 0;
        state.lastSeq = Math.max(state.lastSeq, (Number(msg.count) || 0) - 1);
        if (truncEl && state.dropped > 0) truncEl.hidden = false;
      } else if (msg.type === 'status') {
        applyStatus(msg);
      } else if (msg.type === 'end') {
        state.ended = true;
        flush();
        if (state.lineCount === 0 && state.dropped === 0) setPlaceholder('The log is empty.');
        setConn('complete');
        stopPing();
        sock.close(1000);
      }
    };
    sock.onclose = (ev) => {
      if (ws === sock) ws = null;
      stopPing();
      if (state.ended) {
        setConn('complete');
        return;
      }
      if (DENIED_CODES.has(ev.code)) {
        deny();
        return;
      }
      if (!opened) {
        // A refused handshake looks like 1006: ask the API whether we may still look.
        checkAccess().then((allowed) => (allowed ? scheduleReconnect() : deny()));
        return;
      }
      scheduleReconnect();
    };
  }

  async function checkAccess() {
    const api = logEl.dataset.api;
    if (!api) return true;
    try {
      const r = await fetch(api, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
      return !(r.status === 401 || r.status === 403 || r.status === 404);
    } catch (err) {
      return true; // network trouble: keep trying
    }
  }

  function deny() {
    if (state.state === 'denied') return;
    setConn('denied');
    removePlaceholder();
    panelNote('You do not have access to this log (any more). Sign in again or ask an administrator.');
  }

  function scheduleReconnect() {
    if (state.ended || state.state === 'denied' || reconnectTimer) return;
    const delay = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt);
    attempt++;
    setConn('reconnecting', `reconnecting in ${(delay / 1000).toFixed(1)}s…`);
    reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (!reconnectTimer) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    connect();
  }

  // ---- wiring ----------------------------------------------------------------

  logEl.addEventListener('scroll', () => {
    const bottom = atBottom();
    if (bottom !== state.following) setFollowing(bottom);
  }, { passive: true });

  if (jumpEl) {
    jumpEl.addEventListener('click', () => {
      setFollowing(true);
      scrollToBottom();
      logEl.focus({ preventScroll: true });
    });
  }
  if (followBox) {
    followBox.addEventListener('change', () => {
      setFollowing(followBox.checked);
      if (followBox.checked) scrollToBottom();
    });
  }
  if (wrapBox) {
    const apply = () => {
      logEl.classList.toggle('wrap', wrapBox.checked);
      if (state.following) scrollToBottom();
    };
    wrapBox.addEventListener('change', apply);
    apply();
  }
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') reconnectNow();
  });

  const initial = document.getElementById('deployment-status');
  if (initial) {
    try {
      applyStatus(JSON.parse(initial.textContent));
    } catch (err) {
      /* the server's JSON is trusted to be valid; ignore if not */
    }
  }
  setPlaceholder('Waiting for output…');
  setConn('connecting');
  connect();
})();
