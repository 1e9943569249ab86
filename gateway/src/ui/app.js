// Athanor web UI: experiments (new-run forms from config schemas), instances, the runs
// list (live from /api/events), the live run page (SSE /api/runs/{id}/events) with its
// metric charts (charts.js), and the comparison of runs (/compare?runs=a,b,c).
//
// Everything a run prints is put into the page as text (textContent, never innerHTML).
// The log view is virtualized: a fixed pool of row elements is reused whatever the
// number of lines; rendering happens at most once per animation frame.

'use strict';

import { h } from './dom.js';
import { ChartPanel, MetricChart, PALETTE, Series, chartControls, loadView, swatch } from './charts.js';
import { Feed } from './feed.js';

const ROW_HEIGHT = 18;          // px, matches .line in app.css
const OVERSCAN = 12;            // rows rendered above and below the visible ones
const MAX_LINES = 100_000;      // lines held in memory; older ones are paged in again
const PAGE = 1000;              // lines per page fetched when scrolling up
const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];
const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'lost']);

// ---------------------------------------------------------------- helpers

/** The API token the user gave (when the gateway requires one), kept in this browser. */
const token = () => localStorage.getItem('athanor-token') || '';

/** Shows the token field in the header (after a 401). */
function askForToken(message) {
  const slot = document.querySelector('[data-role=token]');
  if (!slot || slot.childElementCount) return;
  const input = h('input', { type: 'password', placeholder: 'API token', 'aria-label': 'API token', value: token() });
  slot.append(h('span', { class: 'field-error' }, message, ' '), input, ' ',
    h('button', { onclick: () => { localStorage.setItem('athanor-token', input.value.trim()); slot.replaceChildren(); route(); } }, 'Use token'));
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (token()) init.headers.authorization = `Bearer ${token()}`;
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    return { status: 0, body: { error: `cannot reach the gateway: ${e.message}` } };
  }
  let json = null;
  try { json = await response.json(); } catch { json = null; }
  if (response.status === 401) askForToken(json?.error || 'this gateway needs an API token');
  return { status: response.status, body: json };
}

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** µs since the epoch → local `HH:MM:SS.mmm`. */
function clock(micros) {
  const d = new Date(micros / 1000);
  if (!Number.isFinite(d.getTime())) return '--:--:--.---';
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function dateTime(micros) {
  if (!micros) return '';
  const d = new Date(micros / 1000);
  if (!Number.isFinite(d.getTime())) return '';
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function duration(micros) {
  if (micros === null || micros === undefined || micros < 0) return '';
  let s = Math.floor(micros / 1e6);
  const hrs = Math.floor(s / 3600); s -= hrs * 3600;
  const min = Math.floor(s / 60); s -= min * 60;
  return hrs ? `${hrs}h ${pad(min)}m ${pad(s)}s` : min ? `${min}m ${pad(s)}s` : `${s}s`;
}

function badge(status) {
  return h('span', { class: `badge s-${status}`, dataset: { status } }, status);
}

const fmt = new Intl.NumberFormat('en-US');

/** `1 line`, `2 lines`, `10,001 lines`. */
const lineCount = (n) => `${fmt.format(n)} ${n === 1 ? 'line' : 'lines'}`;

/**
 * ANSI SGR colours → spans with classes. Other escape sequences are dropped. The text
 * itself only ever becomes text nodes.
 */
/** OSC sequences (hyperlinks, titles) — `ESC ]` … `BEL` or `ESC \\`: dropped, their
 * visible text kept. */
const OSC = /\u001b\][^\u0007\u001b]*(?:\u0007|\u001b\\)/g;

/** What a terminal would show of a line that redraws itself with `\r` (a progress bar):
 * its newest state. */
function newestState(text) {
  if (!text.includes('\r')) return text;
  return text.split('\n').map((part) => {
    const states = part.replace(/\r$/, '').split('\r');
    return states[states.length - 1];
  }).join('\n');
}

/** Text without terminal escapes, for places that show plain text. */
const plain = (text) => newestState(text).replace(OSC, '').replace(/\u001b\[[0-9;?]*[A-Za-z]/g, '');

function ansi(text) {
  text = newestState(text).replace(OSC, '');
  const frag = document.createDocumentFragment();
  if (!text.includes('\u001b')) {
    frag.append(text);
    return frag;
  }
  const re = /\u001b\[([0-9;]*)([A-Za-z])/g;
  let style = { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, rgb: null };
  let last = 0;
  const emit = (chunk) => {
    if (!chunk) return;
    const plain = !style.fg && !style.bg && !style.bold && !style.dim && !style.italic && !style.underline && !style.rgb;
    if (plain) { frag.append(chunk); return; }
    const span = document.createElement('span');
    const cls = [];
    if (style.fg) cls.push(`fg${style.fg}`);
    if (style.bg) cls.push(`bg${style.bg}`);
    if (style.bold) cls.push('a-bold');
    if (style.dim) cls.push('a-dim');
    if (style.italic) cls.push('a-italic');
    if (style.underline) cls.push('a-underline');
    span.className = cls.join(' ');
    if (style.rgb) span.style.color = style.rgb;
    span.textContent = chunk;
    frag.append(span);
  };
  let m;
  while ((m = re.exec(text)) !== null) {
    emit(text.slice(last, m.index).replace(/\u001b/g, ''));
    last = re.lastIndex;
    if (m[2] !== 'm') continue;
    const codes = m[1] === '' ? [0] : m[1].split(';').map(Number);
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) style = { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, rgb: null };
      else if (c === 1) style.bold = true;
      else if (c === 2) style.dim = true;
      else if (c === 3) style.italic = true;
      else if (c === 4) style.underline = true;
      else if (c === 22) { style.bold = false; style.dim = false; }
      else if (c === 23) style.italic = false;
      else if (c === 24) style.underline = false;
      else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) { style.fg = c; style.rgb = null; }
      else if (c === 39) { style.fg = null; style.rgb = null; }
      else if (c >= 40 && c <= 47) style.bg = c;
      else if (c >= 100 && c <= 107) style.bg = c - 60;
      else if (c === 49) style.bg = null;
      else if (c === 38 && codes[i + 1] === 2 && i + 4 < codes.length) {
        const [r, g, b] = codes.slice(i + 2, i + 5).map((x) => Math.max(0, Math.min(255, x | 0)));
        style.rgb = `rgb(${r}, ${g}, ${b})`; style.fg = null; i += 4;
      } else if (c === 38 && codes[i + 1] === 5) {
        const n = codes[i + 2] | 0;
        style.fg = n < 8 ? 30 + n : n < 16 ? 82 + n : null; style.rgb = null; i += 2;
      } else if (c === 48 && codes[i + 1] === 5) { i += 2; }
      else if (c === 48 && codes[i + 1] === 2) { i += 4; }
    }
  }
  emit(text.slice(last).replace(/\u001b/g, ''));
  return frag;
}

// ---------------------------------------------------------------- router

let cleanup = null;

function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const app = document.getElementById('app');
  app.replaceChildren();
  // The hash decides; without one, the path (`/compare` is served the same page).
  const hash = location.hash || (location.pathname === '/compare' ? '#/compare' : '#/runs');
  const [, page, id] = hash.match(/^#\/([^/?]*)\/?([^?]*)/) || [];
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === (page === 'runs' && id ? '' : page));
  }
  if (page === 'experiments') cleanup = experimentsPage(app);
  else if (page === 'compare') cleanup = comparePage(app, compareIds());
  else if (page === 'runs' && id) cleanup = runPage(app, decodeURIComponent(id));
  else cleanup = runsPage(app);
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', route);

// ---------------------------------------------------------------- footer: what is held

const megabytes = (n) => `${(n / 1e6).toLocaleString('en-US', { maximumFractionDigits: 1 })} MB`;

/** `GET /api/stats` in the footer, and its warning (run output not being stored: the
 * stream is full, or the aggregators cannot write) in a banner: on every page change and every 30 s, every 5 s while warning. */
async function showStats() {
  const foot = document.querySelector('[data-role=stats]');
  const held = document.querySelector('[data-role=held]');
  if (!foot) return;
  const result = await api('GET', '/api/stats');
  if (result.status !== 200) { foot.textContent = ''; return; }
  const s = result.body;
  if (held) {
    held.hidden = !s.warning;
    held.textContent = s.warning ? `Run output is not being stored: ${s.warning}` : '';
  }
  clearTimeout(showStats.again);
  if (s.warning) showStats.again = setTimeout(showStats, 5_000);
  foot.textContent = `${fmt.format(s.runs)} ${s.runs === 1 ? 'run' : 'runs'} · ${lineCount(s.lines)} · `
    + `database ${megabytes(s.database_bytes)} · stream ${megabytes(s.stream_bytes)} (${fmt.format(s.stream_messages)} batches)`;
}
window.addEventListener('hashchange', showStats);
window.addEventListener('DOMContentLoaded', () => { showStats(); setInterval(showStats, 30_000); });

// ---------------------------------------------------------------- experiments

/** A config schema's fields in their declared order (`x-order`), else as listed. */
function ordered(schema) {
  const entries = Object.entries(schema.properties || {});
  const order = Array.isArray(schema['x-order']) ? schema['x-order'] : [];
  const rank = (name) => { const i = order.indexOf(name); return i < 0 ? order.length : i; };
  return entries.sort(([a], [b]) => rank(a) - rank(b));
}

/** A description with `code` spans shown as code (as text: never markup). */
function described(text) {
  return text.split(/(`[^`]+`)/).filter(Boolean)
    .map((part) => (part.length > 2 && part.startsWith('`') && part.endsWith('`') ? h('code', {}, part.slice(1, -1)) : part));
}

/** The id of a form field: one per experiment and field (several forms share a page). */
const fieldId = (experiment, name) => `f-${experiment}-${name}`;

function fieldInput(id, name, schema) {
  const common = { name, id };
  if (Array.isArray(schema.enum)) {
    return h('select', common, schema.enum.map((v) => h('option', { value: v, selected: v === schema.default }, v)));
  }
  if (schema.type === 'boolean') {
    return h('input', { ...common, type: 'checkbox', checked: schema.default === true });
  }
  if (schema.type === 'integer' || schema.type === 'number') {
    return h('input', {
      ...common, type: 'number', step: schema.type === 'integer' ? '1' : 'any',
      min: schema.minimum, max: schema.maximum, value: schema.default ?? '',
    });
  }
  return h('input', { ...common, type: 'text', value: schema.default ?? '' });
}

/** The form's values as a config object (empty optional fields left out). */
function formConfig(form, schema) {
  const config = {};
  for (const [name, field] of Object.entries(schema.properties || {})) {
    const el = form.elements[name];
    if (!el) continue;
    if (field.type === 'boolean') { config[name] = el.checked; continue; }
    const raw = el.value;
    if (raw === '') continue;
    if (field.type === 'integer' || field.type === 'number') {
      const n = Number(raw);
      config[name] = Number.isFinite(n) ? n : raw;
    } else config[name] = raw;
  }
  return config;
}

function showErrors(form, result) {
  for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
  for (const el of form.querySelectorAll('.invalid')) el.classList.remove('invalid');
  const top = form.querySelector('.form-error');
  top.textContent = '';
  const body = result.body || {};
  if (body.field && form.querySelector(`[data-error-for="${CSS.escape(body.field)}"]`)) {
    form.querySelector(`[data-error-for="${CSS.escape(body.field)}"]`).textContent = body.reason || body.error;
    form.elements[body.field]?.classList.add('invalid');
  } else {
    top.textContent = body.error || `the gateway answered ${result.status}`;
  }
}

function experimentCard(exp, onInstancesChanged) {
  const schema = exp.config_schema || {};
  const required = new Set(schema.required || []);
  const rows = ordered(schema).map(([name, field]) => {
    const bounds = [field.minimum !== undefined ? `min ${field.minimum}` : null, field.maximum !== undefined ? `max ${field.maximum}` : null]
      .filter(Boolean).join(', ');
    return h('div', { class: 'form-row' },
      h('label', { for: fieldId(exp.name, name) }, name, required.has(name) ? ' *' : ''),
      h('div', {},
        fieldInput(fieldId(exp.name, name), name, field),
        h('div', { class: 'hint' }, described([field.description, bounds].filter(Boolean).join(' · '))),
        h('div', { class: 'field-error', dataset: { errorFor: name } })));
  });
  const instanceName = h('input', { type: 'text', placeholder: 'instance name', 'aria-label': 'instance name', name: '__instance_name' });
  // novalidate: the API checks the config and its message is shown next to the field.
  const form = h('form', { class: 'card', novalidate: true, dataset: { experiment: exp.name } },
    h('div', { class: 'toolbar' },
      h('strong', { class: 'mono' }, exp.name),
      h('span', { class: 'muted' }, `${exp.workers} worker${exp.workers === 1 ? '' : 's'}`)),
    h('div', { class: 'muted' }, described(exp.description || '')),
    rows,
    h('div', { class: 'form-error' }),
    h('div', { class: 'toolbar' },
      h('button', { type: 'submit', class: 'primary' }, 'Start run'),
      h('span', { class: 'spacer' }),
      instanceName,
      h('button', {
        type: 'button',
        onclick: async () => {
          const result = await api('POST', '/api/instances', {
            name: instanceName.value, experiment: exp.name, config: formConfig(form, schema),
          });
          if (result.status === 201) { instanceName.value = ''; showErrors(form, { body: {} }); onInstancesChanged(); }
          else showErrors(form, result);
        },
      }, 'Save as instance')));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const result = await api('POST', '/api/runs', { experiment: exp.name, config: formConfig(form, schema) });
    if (result.status === 201) location.hash = `#/runs/${encodeURIComponent(result.body.id)}`;
    else showErrors(form, result);
  });
  return form;
}

function experimentsPage(app) {
  const list = h('div', { class: 'grid' }, h('p', { class: 'muted' }, 'Loading…'));
  const instances = h('div', {});
  app.append(h('div', { class: 'page' },
    h('h1', {}, 'Experiments'), list,
    h('h2', {}, 'Instances'), instances));
  const loadInstances = async () => {
    const result = await api('GET', '/api/instances');
    const rows = (result.body?.instances || []).map((inst) => h('tr', {},
      h('td', {}, inst.name),
      h('td', { class: 'mono' }, inst.experiment),
      h('td', { class: 'mono' }, JSON.stringify(inst.config)),
      h('td', {},
        h('button', {
          class: 'primary',
          onclick: async (e) => {
            const r = await api('POST', `/api/instances/${encodeURIComponent(inst.id)}/runs`);
            if (r.status === 201) location.hash = `#/runs/${encodeURIComponent(r.body.id)}`;
            else e.target.after(h('span', { class: 'field-error' }, ` ${r.body?.error || r.status}`));
          },
        }, 'Run'), ' ',
        h('button', {
          class: 'danger',
          onclick: async () => { await api('DELETE', `/api/instances/${encodeURIComponent(inst.id)}`); loadInstances(); },
        }, 'Delete'))));
    instances.replaceChildren(rows.length
      ? h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, 'name'), h('th', {}, 'experiment'), h('th', {}, 'config'), h('th', {}))), h('tbody', {}, rows))
      : h('p', { class: 'muted' }, 'No instances yet: fill in a form above and "Save as instance".'));
  };
  (async () => {
    const result = await api('GET', '/api/experiments');
    const exps = result.body?.experiments || [];
    list.replaceChildren(...(exps.length
      ? exps.map((e) => experimentCard(e, loadInstances))
      : [h('p', { class: 'muted' }, result.status === 200 ? 'No live worker hosts an experiment.' : (result.body?.error || 'Unavailable'))]));
  })();
  loadInstances();
  return () => {};
}

// ---------------------------------------------------------------- runs list

function runsPage(app) {
  const params = new URLSearchParams((location.hash.split('?')[1]) || '');
  const status = h('select', { name: 'status', 'aria-label': 'status' }, h('option', { value: '' }, 'any status'),
    ['pending', 'running', 'completed', 'failed', 'cancelled', 'lost'].map((s) => h('option', { value: s, selected: params.get('status') === s }, s)));
  const experiment = h('input', { type: 'text', name: 'experiment', placeholder: 'experiment', 'aria-label': 'experiment', value: params.get('experiment') || '' });
  const body = h('tbody', {});
  const count = h('span', { class: 'muted' });
  const conn = h('span', { class: 'conn' });
  const selected = new Set();       // runs ticked for a comparison (kept across reloads)
  const compare = h('button', { class: 'primary', disabled: true, dataset: { role: 'compare' } }, 'Compare');
  const syncCompare = () => {
    compare.disabled = selected.size < 2;
    compare.textContent = selected.size ? `Compare ${selected.size}` : 'Compare';
  };
  compare.addEventListener('click', () => {
    location.assign(`/compare?runs=${[...selected].map(encodeURIComponent).join(',')}`);
  });
  app.append(h('div', { class: 'page' },
    h('div', { class: 'toolbar' }, h('h1', {}, 'Runs'), status, experiment, count, compare, h('span', { class: 'spacer' }), conn),
    h('table', {},
      h('thead', {}, h('tr', {}, h('th', { class: 'select' }, h('span', { class: 'sr-only' }, 'compare')),
        ['run', 'experiment', 'status', 'lines', 'created', 'duration', 'error'].map((t) => h('th', {}, t)))),
      body)));
  const rowsById = new Map();
  let timer = null;
  const load = async () => {
    const q = new URLSearchParams({ limit: '100' });
    if (status.value) q.set('status', status.value);
    if (experiment.value.trim()) q.set('experiment', experiment.value.trim());
    const result = await api('GET', `/api/runs?${q}`);
    const runs = result.body?.runs || [];
    rowsById.clear();
    body.replaceChildren(...runs.map((run) => {
      const tick = h('input', { type: 'checkbox', checked: selected.has(run.id), 'aria-label': `compare ${run.id}` });
      tick.addEventListener('change', () => {
        if (tick.checked) selected.add(run.id); else selected.delete(run.id);
        syncCompare();
      });
      const row = h('tr', { dataset: { run: run.id } },
        h('td', { class: 'select' }, tick),
        h('td', { class: 'mono' }, h('a', { href: `#/runs/${encodeURIComponent(run.id)}` }, run.id)),
        h('td', { class: 'mono' }, run.experiment),
        h('td', {}, badge(run.status)),
        h('td', { class: 'mono' }, fmt.format(run.lines)),
        h('td', {}, dateTime(run.created_at)),
        h('td', {}, run.started_at ? duration((run.finished_at || Date.now() * 1000) - run.started_at) : ''),
        h('td', { class: 'muted' }, (run.error || '').slice(0, 120)));
      rowsById.set(run.id, row);
      return row;
    }));
    count.textContent = result.status === 200 ? `${runs.length} of ${result.body.total}` : (result.body?.error || '');
    // A first visit: no runs at all. Say where runs come from.
    if (result.status === 200 && result.body.total === 0 && !status.value && !experiment.value.trim()) {
      body.replaceChildren(h('tr', {}, h('td', { colspan: '8', class: 'muted', dataset: { role: 'empty' } },
        'No runs yet. ', h('a', { href: '#/experiments' }, 'Start one from Experiments →'))));
    }
  };
  const reload = () => { clearTimeout(timer); timer = setTimeout(load, 250); };
  status.addEventListener('change', load);
  experiment.addEventListener('input', reload);
  // The lifecycle feed (feed.js: reconnects after a silence of twice the keep-alive).
  // It has no replay: after any gap in the connection the list is loaded again.
  let live = false;
  let connectedBefore = false;
  const onFeedState = (text, cls, code) => {
    if (cls === 'error' && code === 401) askForToken(text);
    conn.textContent = cls === 'error' && code === 401 ? 'needs the API token' : text;
    conn.className = `conn ${cls === 'error' ? 'reconnecting' : cls}`;
    if (cls === 'live' && !live) {
      if (connectedBefore) reload();
      connectedBefore = true;
    }
    live = cls === 'live' || cls === 'behind';
  };
  const onRun = (change) => {
    const row = rowsById.get(change.run_id);
    if (row && (!status.value || status.value === change.status)) {
      row.children[3].replaceChildren(badge(change.status));
      if (TERMINAL.has(change.status)) reload();
    } else reload();
  };
  const feed = new Feed('/api/events', {
    handlers: { run: onRun, resync: reload },
    onState: onFeedState,
    headers: () => (token() ? { authorization: `Bearer ${token()}` } : {}),
    measureLag: false,
  });
  load();
  return () => { feed.close(); clearTimeout(timer); };
}

// ---------------------------------------------------------------- run page

function runPage(app, runId) {
  const state = {
    run: null,
    total: 0,                 // true number of lines of the run (as far as the feed has seen)
    all: [],                  // contiguous lines (by seq) held in memory, unfiltered
    allHasOlder: false,
    view: [],                 // what the log shows: `all`, or the lines matching the filter
    viewHasOlder: false,
    filter: { levels: new Set(LEVELS), q: '' },
    // A filter's count over the whole log: the stored lines before `all` that match (the
    // gateway counts them; null until it answers), plus those seen from `all` onwards.
    matchedBefore: null,
    matchedAfter: 0,
    filterGeneration: 0,      // bumped by each change of filter: late answers are dropped
    results: new Map(),       // key → {seq, key, value, ts}
    auto: true,               // follow the newest line
    loadingOlder: false,
    selected: null,
    ended: false,
  };
  const filtered = () => state.filter.q !== '' || state.filter.levels.size !== LEVELS.length;
  const matches = (line) => state.filter.levels.has(line.level)
    && (state.filter.q === '' || line.message.toLowerCase().includes(state.filter.q));

  // --- header
  const title = h('h1', { class: 'mono' }, runId);
  const status = h('span', { tabindex: '-1' });
  const elapsed = h('span', { class: 'muted', dataset: { role: 'elapsed' } });
  const barFill = h('div', {});
  const progressBar = h('div', { class: 'bar', role: 'progressbar', 'aria-label': 'progress', 'aria-valuemin': '0' }, barFill);
  // Status changes are announced (the badge is redrawn only when the status changes).
  const announce = h('span', { class: 'sr-only', 'aria-live': 'polite', dataset: { role: 'announce' } });
  const progressText = h('span', { class: 'muted', dataset: { role: 'progress' } });
  const conn = h('span', { class: 'conn', dataset: { role: 'conn' } });
  const cancel = h('button', { class: 'danger', disabled: true, dataset: { role: 'cancel' } }, 'Cancel');
  const cancelMsg = h('span', { class: 'field-error' });
  // Delete (a finished run): asks first, in place — "Delete for good" or "Keep".
  const del = h('button', { class: 'danger', hidden: true, dataset: { role: 'delete' } }, 'Delete');
  const confirmText = h('span', { dataset: { role: 'delete-question' } });
  const confirmDel = h('button', { class: 'danger', dataset: { role: 'delete-confirm' } }, 'Delete for good');
  const keep = h('button', { dataset: { role: 'delete-keep' } }, 'Keep');
  const confirmBox = h('span', { class: 'confirm', role: 'group', 'aria-label': 'confirm deletion', hidden: true }, confirmText, confirmDel, keep);
  const errorText = h('div', { class: 'field-error', dataset: { role: 'error' } });
  // Batches the aggregator rejected: lines missing from the stored log, and why.
  const warningText = h('div', { class: 'run-warning', dataset: { role: 'warning' } });
  // --- log toolbar
  const totalText = h('span', { class: 'mono', dataset: { role: 'total' } });
  const levelButtons = LEVELS.map((l) => h('button', { class: `toggle on l-${l}`, 'aria-pressed': 'true', dataset: { level: l } }, l));
  const search = h('input', { type: 'search', placeholder: 'search', 'aria-label': 'search the log', dataset: { role: 'search' } });
  const download = h('a', { href: `/api/runs/${encodeURIComponent(runId)}/logs.txt`, download: `${runId}.log` }, 'download');
  const spacerY = h('div', { class: 'spacer-y' });
  const rows = h('div', { class: 'rows' });
  const viewport = h('div', { class: 'viewport', dataset: { role: 'viewport' } }, spacerY, rows);
  const jump = h('button', { class: 'jump primary', hidden: true }, '↓ newest');
  const detailText = h('div', {});
  const detailClose = h('button', { class: 'close', 'aria-label': 'Close details', title: 'Close (Esc)' }, '×');
  const detail = h('div', { class: 'detail', dataset: { role: 'detail' }, hidden: true }, detailClose, detailText);
  // --- side
  const info = h('dl', { class: 'kv' });
  const rawToggle = h('button', { class: 'toggle' }, 'raw JSON');
  const resultsBox = h('div', { class: 'results', dataset: { role: 'results' } });
  // --- metrics
  const charts = new ChartPanel();

  app.append(h('div', { class: 'run' },
    h('div', { class: 'run-head' },
      h('a', { href: '#/runs' }, '← runs'), title, status, elapsed,
      h('div', { class: 'progress' }, progressBar, progressText),
      conn, cancel, del, confirmBox, cancelMsg, announce),
    errorText,
    warningText,
    charts.el,
    h('div', { class: 'run-body' },
      h('div', { class: 'logs', style: undefined },
        h('div', { class: 'toolbar' }, totalText, levelButtons, search, h('span', { class: 'spacer' }), download),
        h('div', { class: 'viewport-wrap', style: undefined }, viewport),
        jump, detail),
      h('div', { class: 'side' },
        h('div', { class: 'card' }, info),
        h('div', { class: 'toolbar' }, h('strong', {}, 'Results'), h('span', { class: 'spacer' }), rawToggle),
        resultsBox))));
  // The viewport wrapper takes the free height; the jump button sits over it.
  const wrap = viewport.parentElement;
  wrap.style.flex = '1'; wrap.style.minHeight = '0'; wrap.style.display = 'flex'; wrap.style.position = 'relative';
  viewport.style.flex = '1';
  wrap.append(jump);

  // --- rendering (at most once per frame)
  let frame = 0;
  let dirtyResults = false;
  const schedule = () => { if (!frame) frame = requestAnimationFrame(render); };
  const pool = [];

  function renderHeader() {
    const run = state.run;
    if (!run) return;
    if (status.dataset.shown !== run.status) {
      status.dataset.shown = run.status;
      status.replaceChildren(badge(run.status));
      announce.textContent = `run ${run.status}`;
    }
    const p = run.progress;
    if (p && p.total > 0) {
      barFill.style.width = `${Math.min(100, (100 * p.current) / p.total).toFixed(1)}%`;
      progressBar.setAttribute('aria-valuemax', String(p.total));
      progressBar.setAttribute('aria-valuenow', String(Math.min(p.current, p.total)));
      progressText.textContent = `${fmt.format(p.current)}/${fmt.format(p.total)}${p.message ? ` · ${plain(p.message)}` : ''}`;
    } else if (p) {
      progressText.textContent = plain(p.message || '');
    } else if (run.status === 'pending') {
      progressText.textContent = waiting;
      watchWorkers();
    }
    if (TERMINAL.has(run.status)) {
      // Keep focus on the page's header rather than losing it with the button.
      if (document.activeElement === cancel) status.focus();
      cancel.disabled = true;
      cancel.textContent = run.status === 'cancelled' ? 'Cancelled' : 'Cancel';
      del.hidden = !confirmBox.hidden;
    } else if (cancel.textContent !== 'Cancelling…') {
      cancel.disabled = false;
    }
    errorText.textContent = run.error || '';
    warningText.textContent = run.warning || '';
    title.textContent = `${run.experiment || '…'} · ${run.id}`;
    info.replaceChildren(
      h('dt', {}, 'created'), h('dd', {}, dateTime(run.created_at)),
      h('dt', {}, 'started'), h('dd', {}, dateTime(run.started_at)),
      h('dt', {}, 'finished'), h('dd', {}, dateTime(run.finished_at)),
      h('dt', {}, 'worker'), h('dd', {}, run.worker_id || ''),
      h('dt', {}, 'config'), h('dd', { title: JSON.stringify(run.config) }, JSON.stringify(run.config)));
  }

  // A pending run: how many of the workers that host its experiment are busy, asked
  // again every 2 s until the run starts.
  let closed = false;        // the page was left
  let waiting = 'waiting for a worker to take it';
  let watchingWorkers = null;
  function watchWorkers() {
    if (watchingWorkers) return;
    const ask = async () => {
      const run = state.run;
      if (!run || run.status !== 'pending' || closed) { watchingWorkers = null; return; }
      const result = await api('GET', '/api/experiments');
      if (result.status === 200) {
        const hosting = (result.body.experiments || []).find((e) => e.name === run.experiment);
        waiting = !hosting
          ? `waiting for a worker: no live worker hosts ${run.experiment}`
          : `waiting for a worker: ${hosting.busy} of ${hosting.workers} hosting it ${hosting.busy === 1 ? 'is' : 'are'} busy`;
        if (state.run?.status === 'pending') progressText.textContent = waiting;
      }
      watchingWorkers = setTimeout(ask, 2000);
    };
    watchingWorkers = setTimeout(ask, 0);
  }

  function tickElapsed() {
    const run = state.run;
    if (!run || !run.started_at) { elapsed.textContent = ''; return; }
    const end = run.finished_at || Date.now() * 1000;
    elapsed.textContent = duration(end - run.started_at);
  }

  function renderRows() {
    const n = state.view.length;
    spacerY.style.height = `${n * ROW_HEIGHT}px`;
    if (state.auto) viewport.scrollTop = viewport.scrollHeight;
    const top = viewport.scrollTop;
    const visible = Math.ceil(viewport.clientHeight / ROW_HEIGHT) + 1;
    // The scroll position may still be that of a longer view (a filter or a snapshot
    // just shortened it): never start past the end.
    const first = Math.max(0, Math.min(Math.floor(top / ROW_HEIGHT) - OVERSCAN, n - visible - OVERSCAN));
    const last = Math.max(first, Math.min(n, first + visible + 2 * OVERSCAN));
    while (pool.length < last - first) {
      const el = h('div', { class: 'line', tabindex: '0' }, h('span', { class: 'seq' }), h('span', { class: 'ts' }), h('span', { class: 'lvl' }), h('span', { class: 'msg' }));
      pool.push(el);
    }
    rows.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
    const wanted = last - first;
    while (rows.childElementCount > wanted) rows.lastElementChild?.remove();
    for (let i = 0; i < wanted; i++) {
      const line = state.view[first + i];
      const el = pool[i];
      if (el.parentNode !== rows) rows.append(el);
      if (el._line === line) continue;
      el._line = line;
      el.dataset.seq = line.seq;
      el.children[0].textContent = line.seq;
      el.children[1].textContent = clock(line.ts);
      el.children[2].textContent = line.level.toUpperCase();
      el.children[2].className = `lvl l-${line.level}`;
      el.children[3].replaceChildren(ansi(line.message.replace(/\r?\n/g, ' ⏎ ')));
    }
    jump.hidden = state.auto;
    totalText.textContent = filtered()
      ? `${state.matchedBefore === null ? '…' : fmt.format(state.matchedBefore + state.matchedAfter)} matching · ${lineCount(state.total)}`
      : lineCount(state.total);
  }

  function render() {
    frame = 0;
    renderRows();
    if (dirtyResults) { dirtyResults = false; renderResults(); }
  }

  // --- results: a tree with lazy expansion, or the raw JSON
  const expanded = new Set();
  let raw = false;
  function valueNode(value, path) {
    if (value !== null && typeof value === 'object') {
      const entries = Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value);
      const open = expanded.has(path);
      const li = h('li', {});
      const twisty = h('span', { class: 'twisty', role: 'button', tabindex: '0', 'aria-expanded': String(open), 'aria-label': open ? 'collapse' : 'expand' }, open ? '▾' : '▸');
      const summary = Array.isArray(value) ? `[${entries.length}]` : `{${entries.length}}`;
      return { twisty, summary, children: open ? h('ul', { class: 'tree' }, entries.map(([k, v]) => treeItem(String(k), v, `${path}/${k}`))) : null, li };
    }
    const cls = typeof value === 'string' ? 'v-string' : typeof value === 'number' ? 'v-number' : 'v-other';
    return { leaf: h('span', { class: cls }, JSON.stringify(value)) };
  }
  function treeItem(key, value, path) {
    const node = valueNode(value, path);
    if (node.leaf) return h('li', {}, h('span', { class: 'leaf' }), h('span', { class: 'k' }, key), ': ', node.leaf);
    const li = h('li', {}, node.twisty, h('span', { class: 'k' }, key), ': ', h('span', { class: 'muted' }, node.summary), node.children);
    const toggle = () => {
      if (expanded.has(path)) expanded.delete(path); else expanded.add(path);
      const next = treeItem(key, value, path);
      li.replaceWith(next);
      next.querySelector('.twisty')?.focus();
    };
    node.twisty.addEventListener('click', toggle);
    node.twisty.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); toggle(); } });
    return li;
  }
  function renderResults() {
    const sorted = [...state.results.values()].sort((a, b) => a.key.localeCompare(b.key, 'en', { numeric: true }));
    if (raw) {
      // A null-prototype object: a key named `__proto__` is a key like any other.
      const obj = Object.create(null);
      for (const r of sorted) obj[r.key] = r.value;
      resultsBox.replaceChildren(h('pre', { class: 'raw' }, JSON.stringify(obj, null, 2)));
    } else if (sorted.length === 0) {
      resultsBox.replaceChildren(h('span', { class: 'muted' }, 'No results yet.'));
    } else {
      resultsBox.replaceChildren(h('ul', { class: 'tree root' }, sorted.map((r) => treeItem(r.key, r.value, `/${r.key}`))));
    }
  }
  rawToggle.addEventListener('click', () => { raw = !raw; rawToggle.classList.toggle('on', raw); renderResults(); });
  const setResult = (r) => {
    const old = state.results.get(r.key);
    if (!old || old.seq < r.seq) { state.results.set(r.key, r); dirtyResults = true; }
  };

  // --- the log model
  function trimFront() {
    if (state.all.length > MAX_LINES) {
      state.all.splice(0, state.all.length - MAX_LINES);
      state.allHasOlder = true;
    }
    if (state.view !== state.all && state.view.length > MAX_LINES) {
      const drop = state.view.length - MAX_LINES;
      state.view.splice(0, drop);
      state.viewHasOlder = true;
      if (!state.auto) viewport.scrollTop -= drop * ROW_HEIGHT;
    }
  }
  const filterQuery = (q) => {
    if (state.filter.levels.size !== LEVELS.length) q.set('level', [...state.filter.levels].join(','));
    if (state.filter.q) q.set('q', state.filter.q);
    return q;
  };
  function applyFilter() {
    state.filterGeneration += 1;
    state.loadingOlder = false;
    if (filtered()) {
      state.view = state.all.filter(matches);
      state.viewHasOlder = state.allHasOlder;
      state.matchedAfter = state.view.length;
      state.matchedBefore = state.allHasOlder ? null : 0;
      if (state.allHasOlder) countEarlier();
    } else {
      state.view = state.all;
      state.viewHasOlder = state.allHasOlder;
    }
    state.auto = true;
    schedule();
  }
  // The matches before the lines in memory: counted by the gateway over the whole stored
  // log, and the newest page of them shown at once (scrolling up pages in the rest).
  async function countEarlier() {
    const generation = state.filterGeneration;
    const boundary = state.all.length ? state.all[0].seq : state.total;
    const q = filterQuery(new URLSearchParams({ before: String(boundary), limit: String(PAGE), count: 'true' }));
    // This fetches the page before the boundary too: scrolling waits for it, or
    // the same lines would be prepended twice.
    state.loadingOlder = true;
    const result = await api('GET', `/api/runs/${encodeURIComponent(runId)}/logs?${q}`);
    if (generation !== state.filterGeneration) return;
    state.loadingOlder = false;
    if (result.status !== 200) {
      totalText.title = result.body?.error || `the gateway answered ${result.status}`;
      return;
    }
    state.matchedBefore = result.body.matching;
    const older = result.body.lines || [];
    state.view = older.concat(state.view);
    state.viewHasOlder = result.body.more;
    if (!state.auto) viewport.scrollTop += older.length * ROW_HEIGHT;
    schedule();
  }
  async function loadOlder() {
    if (state.loadingOlder || !state.viewHasOlder) return;
    state.loadingOlder = true;
    const firstSeq = Math.min(state.view.length ? state.view[0].seq : Infinity, state.all.length ? state.all[0].seq : Infinity);
    const q = new URLSearchParams({ before: String(Number.isFinite(firstSeq) ? firstSeq : state.total), limit: String(PAGE) });
    if (filtered()) filterQuery(q);
    const generation = state.filterGeneration;
    const viewBefore = state.view;
    const result = await api('GET', `/api/runs/${encodeURIComponent(runId)}/logs?${q}`);
    if (generation !== state.filterGeneration) return;
    state.loadingOlder = false;
    if (result.status !== 200 || state.view !== viewBefore) return;
    const older = result.body.lines || [];
    if (older.length === 0 && !result.body.more) { state.viewHasOlder = false; if (!filtered()) state.allHasOlder = false; return; }
    if (filtered()) {
      state.view = older.concat(state.view);
      state.viewHasOlder = result.body.more;
    } else {
      state.all = older.concat(state.all);
      state.view = state.all;
      state.allHasOlder = state.viewHasOlder = older.length > 0 && older[0].seq > 0;
    }
    viewport.scrollTop += older.length * ROW_HEIGHT;
    schedule();
  }
  viewport.addEventListener('scroll', () => {
    const atBottom = viewport.scrollTop + viewport.clientHeight >= viewport.scrollHeight - ROW_HEIGHT * 2;
    state.auto = atBottom;
    if (viewport.scrollTop < ROW_HEIGHT * 30) loadOlder();
    schedule();
  }, { passive: true });
  jump.addEventListener('click', () => { state.auto = true; schedule(); });
  rows.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && e.target.closest('.line')) e.target.closest('.line').click();
  });
  rows.addEventListener('click', (e) => {
    const el = e.target.closest('.line');
    if (!el || !el._line) return;
    const line = el._line;
    detailText.textContent = `#${line.seq} ${clock(line.ts)} ${line.level.toUpperCase()}\n${line.message}`
      + (line.metadata !== undefined && line.metadata !== null ? `\n${JSON.stringify(line.metadata, null, 2)}` : '');
    detail.hidden = false;
  });
  const closeDetail = () => { detail.hidden = true; };
  detailClose.addEventListener('click', closeDetail);
  const onKey = (e) => { if (e.key === 'Escape' && !detail.hidden) closeDetail(); };
  document.addEventListener('keydown', onKey);
  for (const b of levelButtons) {
    b.addEventListener('click', () => {
      const l = b.dataset.level;
      if (state.filter.levels.has(l)) state.filter.levels.delete(l); else state.filter.levels.add(l);
      b.classList.toggle('on', state.filter.levels.has(l));
      b.setAttribute('aria-pressed', String(state.filter.levels.has(l)));
      applyFilter();
    });
  }
  let searchTimer = null;
  search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.filter.q = search.value.trim().toLowerCase(); applyFilter(); }, 250);
  });
  cancel.addEventListener('click', async () => {
    cancelMsg.textContent = '';
    const result = await api('POST', `/api/runs/${encodeURIComponent(runId)}/cancel`);
    if (result.status === 202) cancelMsg.textContent = '';
    else cancelMsg.textContent = result.body?.error || `the gateway answered ${result.status}`;
    if (result.status === 202) {
      status.focus();
      cancel.disabled = true;
      // The run's end may have arrived before this answer did.
      if (!TERMINAL.has(state.run?.status)) cancel.textContent = 'Cancelling…';
    }
  });

  del.addEventListener('click', () => {
    cancelMsg.textContent = '';
    confirmText.textContent = `Delete this run, its ${lineCount(state.total)} and its results and metrics? This cannot be undone.`;
    del.hidden = true;
    confirmBox.hidden = false;
    keep.focus();
  });
  keep.addEventListener('click', () => {
    confirmBox.hidden = true;
    del.hidden = false;
    del.focus();
  });
  confirmDel.addEventListener('click', async () => {
    confirmDel.disabled = true;
    const result = await api('DELETE', `/api/runs/${encodeURIComponent(runId)}`);
    confirmDel.disabled = false;
    if (result.status === 200) {
      location.hash = '#/runs';
      return;
    }
    confirmBox.hidden = true;
    del.hidden = false;
    cancelMsg.textContent = result.body?.error || `the gateway answered ${result.status}`;
  });

  // --- the feed (feed.js: resumes with Last-Event-ID, reconnects after a silence of
  // twice the keep-alive, skips ahead to a fresh snapshot when far behind)
  const setConn = (text, cls) => {
    if (state.ended && cls !== 'ended') return;
    conn.textContent = text;
    conn.className = `conn ${cls}`;
  };
  let feed = null;
  const onFeedState = (text, cls, status) => {
    if (cls !== 'error') return setConn(text, cls);
    if (status === 401) {
      askForToken(text);
      return setConn('needs the API token', 'reconnecting');
    }
    if (status === 404) errorText.textContent = text;
    setConn(status === 404 ? 'no such run' : text, 'ended');
  };
  function connect() {
    feed = new Feed(`/api/runs/${encodeURIComponent(runId)}/events`, {
      handlers: { snapshot: onSnapshot, batch: onBatch, status: onStatus },
      onState: onFeedState,
      headers: () => (token() ? { authorization: `Bearer ${token()}` } : {}),
    });
  }
  function onSnapshot(snap) {
    state.run = snap.run;
    state.total = snap.lines;
    state.all = snap.tail;
    state.allHasOlder = snap.tail.length ? snap.tail[0].seq > 0 : snap.lines > 0;
    state.results = new Map(Object.entries(snap.results));
    dirtyResults = true;
    charts.snapshot(snap.metrics);
    applyFilter();
    renderHeader();
    tickElapsed();
  }
  // A run that started after the page opened: the feed does not carry its worker; ask
  // the API (again each second until it knows, at most until shortly after the end).
  let askingWorker = false;  // a request or its retry is pending
  function fillWorker(tries = 30) {
    if (askingWorker || state.run?.worker_id) return;
    askingWorker = true;
    const ask = (left) => api('GET', `/api/runs/${encodeURIComponent(runId)}`).then((r) => {
      if (r.status === 200 && state.run && r.body.worker_id) {
        state.run.worker_id = r.body.worker_id;
        state.run.started_at = state.run.started_at || r.body.started_at;
        renderHeader();
        askingWorker = false;
      } else if (left > 1) {
        setTimeout(() => ask(left - 1), 1000);
      } else {
        askingWorker = false;
      }
    });
    ask(tries);
  }
  function onBatch(batch) {
    const run = state.run;
    state.total += batch.logs.length;
    for (const line of batch.logs) state.all.push(line);
    if (state.view !== state.all) {
      for (const line of batch.logs) if (matches(line)) { state.view.push(line); state.matchedAfter += 1; }
    }
    trimFront();
    for (const r of batch.results) setResult(r);
    if (batch.metrics) charts.records(batch.metrics);
    if (run) {
      if (batch.progress) run.progress = batch.progress;
      if (batch.status) {
        run.status = batch.status;
        if (batch.error) run.error = batch.error;
      } else if (run.status === 'pending') run.status = 'running';
      if (!run.worker_id) fillWorker();
      if (!run.started_at && batch.status === 'running') run.started_at = Date.now() * 1000;
      renderHeader();
    }
    schedule();
  }
  function onStatus(end) {
    state.ended = true;
    if (state.run && !state.run.worker_id) fillWorker(3);
    if (state.run) {
      state.run.status = end.status;
      state.run.error = end.error;
      state.run.finished_at = end.finished_at || state.run.finished_at || Date.now() * 1000;
    }
    state.total = end.lines;
    conn.textContent = 'ended';
    conn.className = 'conn ended';
    renderHeader();
    tickElapsed();
    schedule();
  }
  connect();
  const ticker = setInterval(tickElapsed, 1000);
  const onResize = () => schedule();
  window.addEventListener('resize', onResize);
  return () => {
    closed = true;
    clearTimeout(watchingWorkers);
    feed?.close();
    document.removeEventListener('keydown', onKey);
    clearInterval(ticker);
    window.removeEventListener('resize', onResize);
    if (frame) cancelAnimationFrame(frame);
    charts.destroy();
  };
}

// ---------------------------------------------------------------- comparison

/** The runs compared: `runs=a,b,c` of `/compare?…` or `#/compare?…` (at most 20). */
function compareIds() {
  const query = location.hash.startsWith('#/compare') ? (location.hash.split('?')[1] || '') : location.search.slice(1);
  const ids = (new URLSearchParams(query).get('runs') || '').split(',').map((s) => s.trim()).filter(Boolean);
  return [...new Set(ids)].slice(0, 20);
}

/** A value in a table cell: JSON, cut when long (the whole of it in the title). */
function jsonCell(value, present) {
  if (!present) return h('td', { class: 'value muted' }, '—');
  const text = JSON.stringify(value);
  return h('td', { class: 'value', title: text.length > 200 ? text : undefined }, text.length > 200 ? `${text.slice(0, 200)}…` : text);
}

/**
 * A table of fields (rows) by run (columns); a row whose values are not all the same is
 * marked `differs` (highlighted, and ≠ for those who cannot see the colour).
 */
function fieldTable(role, runs, rowsOf) {
  const keys = new Set();
  const maps = runs.map((run) => { const m = rowsOf(run); for (const k of m.keys()) keys.add(k); return m; });
  if (keys.size === 0) return h('p', { class: 'muted' }, 'None.');
  const rows = [...keys].sort((a, b) => a.localeCompare(b, 'en', { numeric: true })).map((key) => {
    const texts = maps.map((m) => (m.has(key) ? JSON.stringify(m.get(key)) : undefined));
    const differs = texts.some((t) => t !== texts[0]);
    return h('tr', { class: differs ? 'differs' : undefined, dataset: { field: key, differs: String(differs) } },
      h('th', { scope: 'row', class: 'mono' }, key, differs ? h('span', { class: 'differs-mark', title: 'the runs differ' }, ' ≠') : null),
      maps.map((m) => jsonCell(m.get(key), m.has(key))));
  });
  return h('table', { class: 'compare', dataset: { role } },
    h('thead', {}, h('tr', {}, h('th', {}, 'field'), runs.map((run) => h('th', { class: 'mono' }, swatch(run.color), ' ', run.id)))),
    h('tbody', {}, rows));
}

function comparePage(app, ids) {
  const view = loadView({});
  const runs = ids.map((id, i) => ({ id, color: PALETTE[i % PALETTE.length], view: null, results: [] }));
  const runsList = h('ul', { class: 'compare-runs', dataset: { role: 'compare-runs' } });
  const message = h('p', { class: 'field-error', dataset: { role: 'error' } });
  const grid = h('div', { class: 'compare-grid', dataset: { role: 'compare-charts' } });
  const metricsNote = h('p', { class: 'muted' });
  const configBox = h('div', {});
  const resultsBox = h('div', {});
  const charts = new Map();       // metric name → { chart, series: [Series per run] }
  let frame = 0;
  const redraw = (what) => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      for (const c of charts.values()) { if (what === 'axes') c.chart.destroy(); c.chart.draw(c.series); }
    });
  };
  app.append(h('div', { class: 'page' },
    h('h1', {}, `Compare ${ids.length} run${ids.length === 1 ? '' : 's'}`),
    runsList, message,
    h('div', { class: 'toolbar' }, h('h2', {}, 'Metrics'),
      chartControls(view, [['step', 'step'], ['elapsed', 'time since first point']], redraw)),
    metricsNote, grid,
    h('h2', {}, 'Config'), configBox,
    h('h2', {}, 'Results'), resultsBox));
  if (ids.length === 0) {
    message.textContent = 'No runs to compare: tick runs in the list and press Compare, or open /compare?runs=a,b,c.';
    return () => {};
  }

  let timer = null;
  let closed = false;
  const enc = encodeURIComponent;
  async function load() {
    const [views, results, lists] = await Promise.all([
      Promise.all(ids.map((id) => api('GET', `/api/runs/${enc(id)}`))),
      Promise.all(ids.map((id) => api('GET', `/api/runs/${enc(id)}/results`))),
      Promise.all(ids.map((id) => api('GET', `/api/runs/${enc(id)}/metrics`))),
    ]);
    if (closed) return;
    const problems = [];
    runs.forEach((run, i) => {
      run.view = views[i].status === 200 ? views[i].body : null;
      if (!run.view) problems.push(`${run.id}: ${views[i].body?.error || `the gateway answered ${views[i].status}`}`);
      run.results = results[i].status === 200 ? results[i].body.results : [];
    });
    message.textContent = problems.join('; ');
    runsList.replaceChildren(...runs.map((run) => h('li', { dataset: { run: run.id } },
      swatch(run.color),
      h('a', { class: 'mono', href: `/#/runs/${enc(run.id)}` }, run.id),
      run.view ? h('span', { class: 'mono muted' }, run.view.experiment) : null,
      run.view ? badge(run.view.status) : null)));
    const present = runs.filter((run) => run.view);
    configBox.replaceChildren(fieldTable('config', present, (run) => new Map([
      ['experiment', run.view.experiment],
      ...Object.entries(run.view.config && typeof run.view.config === 'object' ? run.view.config : { config: run.view.config }),
    ])));
    resultsBox.replaceChildren(fieldTable('results', present, (run) => new Map(run.results.map((r) => [r.key, r.value]))));

    // The metrics at least two of the runs have (all of one run's when it is alone),
    // the most recently updated first.
    const seen = new Map();       // name → { runs, updated }
    for (const l of lists) {
      for (const m of (l.status === 200 ? l.body.metrics : [])) {
        const s = seen.get(m.name) || { runs: 0, updated: 0 };
        s.runs += 1;
        s.updated = Math.max(s.updated, m.updated_at);
        seen.set(m.name, s);
      }
    }
    const shared = [...seen].filter(([, s]) => s.runs >= Math.min(2, ids.length))
      .sort(([an, a], [bn, b]) => (b.updated - a.updated) || an.localeCompare(bn, 'en', { numeric: true }))
      .map(([name]) => name);
    const failed = lists.find((l) => l.status !== 200);
    metricsNote.textContent = failed ? `Metrics unavailable: ${failed.body?.error || `the gateway answered ${failed.status}`}`
      : shared.length ? '' : 'The runs share no metric.';
    const q = `runs=${ids.map(enc).join(',')}&max_points=1000`;
    const series = await Promise.all(shared.map((name) => api('GET', `/api/metrics/${enc(name)}?${q}`)));
    if (closed) return;
    shared.forEach((name, i) => {
      if (series[i].status !== 200) return;
      let c = charts.get(name);
      if (!c) {
        c = { chart: new MetricChart(name, runs.map((run) => ({ label: run.id, color: run.color })), view), series: [] };
        charts.set(name, c);
      }
      const byRun = new Map(series[i].body.runs.map((r) => [r.run_id, r]));
      c.series = ids.map((id) => Series.from(byRun.get(id) || { buckets: [] }, Infinity));
    });
    grid.replaceChildren(...shared.filter((name) => charts.has(name)).map((name) => charts.get(name).chart.el));
    for (const name of shared) charts.get(name)?.chart.draw(charts.get(name).series);
    // Live runs: look again in a while.
    if (present.some((run) => !TERMINAL.has(run.view.status))) timer = setTimeout(load, 2000);
  }
  load();
  const onResize = () => { for (const c of charts.values()) c.chart.resize(); };
  window.addEventListener('resize', onResize);
  return () => {
    closed = true;
    clearTimeout(timer);
    if (frame) cancelAnimationFrame(frame);
    window.removeEventListener('resize', onResize);
    for (const c of charts.values()) c.chart.destroy();
  };
}
