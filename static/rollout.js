// Live rollout page: polls the rollout's JSON (GET /api/rollouts/<id>/) every second until it has
// finished, and updates the counts, the status and each node's row in place.  A failed node's last
// log lines are asked for once (?tails=<ids>).  Plain ES2020; text goes in through textContent only.
(() => {
  'use strict';

  const table = document.getElementById('rollout-nodes');
  if (!table || !table.dataset.api) return;

  const INTERVAL = 1000;
  const BACKOFF_MAX = 10000;
  // Rendered into the page from Rollout.TERMINAL: one definition of which statuses are final.
  const TERMINAL = new Set(JSON.parse(document.getElementById('rollout-terminal-statuses').textContent));

  // Public, for tests and the curious.
  const state = { polls: 0, errors: 0, status: null, done: false, tails: 0 };
  window.panelRollout = state;

  const asked = new Set(); // deployments whose tail was requested (or came with the page)
  for (const tr of document.querySelectorAll('tr.tail-row:not([hidden])')) asked.add(Number(tr.id.slice(5)));
  let delay = INTERVAL;

  function setBadge(el, status, label) {
    if (!el) return;
    el.className = `badge badge-${status}`;
    el.dataset.status = status;
    const text = el.querySelector('.badge-label');
    if (text && text.textContent !== label) text.textContent = label;
  }

  function setText(el, text) {
    if (el && el.textContent !== text) el.textContent = text;
  }

  function renderTail(row, lines) {
    const tailRow = document.getElementById(`tail-${row.deployment}`);
    if (!tailRow || !lines) return;
    const pre = tailRow.querySelector('pre');
    pre.replaceChildren();
    for (const [, stream, text] of lines) {
      const span = document.createElement('span');
      if (stream === 'e') span.className = 'err';
      else if (stream === 's') span.className = 'sys';
      span.textContent = text;
      pre.append(span, '\n');
    }
    tailRow.hidden = false;
    state.tails += 1;
  }

  function updateRow(row) {
    const tr = document.getElementById(`node-${row.deployment}`);
    if (!tr) return;
    tr.dataset.status = row.status;
    const badge = tr.querySelector('.cell-status .badge');
    setBadge(badge, row.status, row.status_label);
    let note = tr.querySelector('.cell-status .stopping');
    if (row.cancel_requested && row.status === 'running') {
      if (!note) {
        note = document.createElement('span');
        note.className = 'muted small stopping';
        note.textContent = ' stopping…';
        tr.querySelector('.cell-status').append(note);
      }
    } else if (note) {
      note.remove();
    }
    setText(tr.querySelector('.cell-exit'), row.exit_code === null ? '—' : String(row.exit_code));
    const cell = tr.querySelector('.cell-duration');
    if (row.started_at) {
      let span = cell.querySelector('.js-duration');
      if (!span) {
        span = document.createElement('span');
        span.className = 'js-duration';
        cell.replaceChildren(span);
      }
      span.dataset.start = row.started_at;
      if (row.finished_at) span.dataset.end = row.finished_at;
      else delete span.dataset.end;
    }
    setText(tr.querySelector('.cell-message'), row.status === 'succeeded' ? '' : (row.error_message || '').slice(0, 160));
    if (row.tail) renderTail(row, row.tail);
  }

  function apply(data) {
    state.status = data.status;
    setBadge(document.getElementById('rollout-status'), data.status, data.status_label);
    const reason = document.getElementById('stop-reason');
    if (reason) {
      setText(reason, data.stop_reason);
      reason.hidden = !data.stop_reason;
    }
    for (const [name, n] of Object.entries(data.counts)) {
      setText(document.querySelector(`[data-count="${name}"]`), String(n));
    }
    for (const row of data.nodes) updateRow(row);
    if (data.finished_at) {
      const el = document.getElementById('finished-at');
      if (el && !el.getAttribute('datetime')) {
        el.setAttribute('datetime', data.finished_at);
        if (window.panel) window.panel.localizeTimes(el.parentElement);
      }
    }
    if (window.panel) window.panel.refreshDurations(table);
    // Failed rows whose tail is not shown yet: ask for it with the next poll.
    const wanted = data.nodes
      .filter((row) => row.bucket === 'failed' && !row.tail && !asked.has(row.deployment))
      .map((row) => row.deployment);
    if (data.terminal) {
      const form = document.getElementById('cancel-form');
      if (form) form.hidden = true;
    }
    return wanted;
  }

  async function poll(tails) {
    const url = `${table.dataset.api}?tails=${tails.join(',')}`;
    for (const id of tails) asked.add(id);
    let wanted = [];
    try {
      const response = await fetch(url, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      state.polls += 1;
      wanted = apply(body.rollout);
      delay = INTERVAL;
      if (body.rollout.terminal && !wanted.length) {
        state.done = true;
        document.body.dataset.rolloutState = 'complete';
        return;
      }
    } catch (err) {
      state.errors += 1;
      for (const id of tails) asked.delete(id);
      wanted = tails;
      delay = Math.min(delay * 2, BACKOFF_MAX);
    }
    setTimeout(() => poll(wanted), wanted.length ? 0 : delay);
  }

  document.body.dataset.rolloutState = 'live';
  poll([]);
})();
