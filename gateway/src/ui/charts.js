// Metric charts: each series held in a bounded model (buckets that keep their minimum,
// maximum and last point — the scheme of the server's SeriesSketch: past 2 × target
// buckets the width doubles and neighbours merge), drawn with uPlot (vendored, global
// `uPlot`) at most once per animation frame, and only while on screen.
//
// A bucket's min and max are drawn as a band with its edges stroked, so a one-step
// spike in a wide bucket stays visible; NaN is a gap; ±∞ is clipped just past the
// finite range and marked with a point (the legend says +∞ / −∞). Metric names, run ids
// and values only ever become text.
//
// Each time uPlot has painted a chart, the chart's <figure> fires a bubbling
// `chart-drawn` event whose detail is the newest point drawn ({ step, ts }, ts in µs):
// what the browser tests measure "point emitted → drawn" with.

'use strict';

import { h } from './dom.js';

/** Buckets a series aims at; it holds at most twice as many. */
export const TARGET = 500;
const HEIGHT = 170;                 // px of each plot
const FRAME_BUDGET_MS = 8;         // chart drawing per animation frame
// How often a chart is redrawn while points arrive adapts to what drawing costs here:
// the charts on screen, each redrawn once per interval, take about DRAW_SHARE of the
// main thread (interval = their count × the chart's measured cost / DRAW_SHARE), but
// never more often than MIN_REDRAW_MS (the worker flushes every 100 ms, so about once
// per batch) nor less often than MAX_REDRAW_MS.
const DRAW_SHARE = 0.25;
const MIN_REDRAW_MS = 50;
const MAX_REDRAW_MS = 1000;
const RESORT_MS = 2000;             // how often "most recently updated first" is applied again
const SETTINGS_KEY = 'athanor-charts';
const INF_COLOR = '#d53f8c';
/** Run colours (compare page); readable on both themes. */
export const PALETTE = ['#3b82f6', '#e8590c', '#2f9e44', '#ae3ec9', '#0c8599', '#d6336c', '#845ef7', '#f59f00', '#495057', '#66a80f'];

// ---------------------------------------------------------------- values

/** A value off the wire: a number, or the strings "NaN", "Infinity", "-Infinity". */
export function metricValue(v) {
  if (typeof v === 'number') return v;
  if (v === 'Infinity' || v === '+Infinity' || v === 'inf') return Infinity;
  if (v === '-Infinity' || v === '-inf') return -Infinity;
  return NaN;
}

/** A value for reading: six significant digits, NaN and ±∞ by name. */
export function formatValue(v) {
  if (v === null || v === undefined) return '–';
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+∞';
  if (v === -Infinity) return '−∞';
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-4)) return v.toExponential(4);
  return String(Number(v.toPrecision(6)));
}

const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumSignificantDigits: 3 });

/** An axis tick: short (1.2M, 0.0075, 3e-7). */
function tickLabel(v) {
  if (v === null || v === undefined) return '';
  const a = Math.abs(v);
  if (a >= 1e4) return compact.format(v);
  if (a !== 0 && a < 1e-3) return v.toExponential(1).replace('.0e', 'e');
  return String(Number(v.toPrecision(4)));
}

/** Room for the widest tick label of the y axis. */
function yAxisSize(u, values) {
  const longest = values ? Math.max(0, ...values.map((t) => String(t).length)) : 4;
  return Math.max(40, 24 + 8 * longest);
}

const byName = (a, b) => a.localeCompare(b, 'en', { numeric: true });

// ---------------------------------------------------------------- the bounded series

/** Folds bucket `b` into `a` (the same rule as the server's MetricBucket::merge). */
function mergeInto(a, b) {
  if (b.step >= a.step) { a.step = b.step; a.ts = b.ts; a.value = b.value; }
  if (b.min < a.min || (Number.isNaN(a.min) && !Number.isNaN(b.min))) { a.min = b.min; a.minStep = b.minStep; }
  if (b.max > a.max || (Number.isNaN(a.max) && !Number.isNaN(b.max))) { a.max = b.max; a.maxStep = b.maxStep; }
  a.count += b.count;
}

/**
 * One metric series within about 2 × `target` buckets, in step order. Each bucket spans
 * `width` steps (`floor(step / width)` is its index) and keeps its last point
 * (step, ts, value), its minimum and maximum with their steps, and its count. While the
 * width is 1 it is exact, and for a repeated step the record with the higher seq wins.
 */
export class Series {
  constructor(target = TARGET) {
    this.target = Math.max(1, target);
    this.width = 1;
    this.buckets = [];
    this.updated = 0;               // µs: the newest point's time
  }

  /** A series as the API and the snapshot carry it ({width, buckets: [...]}). */
  static from(wire, target = TARGET) {
    const series = new Series(target);
    series.width = Math.max(1, wire.width || 1);
    for (const b of wire.buckets || []) {
      series.put({
        step: b.step, ts: b.ts, value: metricValue(b.value), min: metricValue(b.min), minStep: b.min_step,
        max: metricValue(b.max), maxStep: b.max_step, count: b.count, seq: -1,
      });
    }
    series.shrink();
    return series;
  }

  add(step, ts, value, seq) {
    this.put({ step, ts, value, min: value, minStep: step, max: value, maxStep: step, count: 1, seq });
    this.shrink();
  }

  put(p) {
    if (p.ts > this.updated) this.updated = p.ts;
    const w = this.width;
    const index = Math.floor(p.step / w);
    const bs = this.buckets;
    const n = bs.length;
    if (n === 0 || Math.floor(bs[n - 1].step / w) < index) { bs.push(p); return; }
    let lo = 0;
    let hi = n;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (Math.floor(bs[mid].step / w) < index) lo = mid + 1; else hi = mid;
    }
    if (lo < n && Math.floor(bs[lo].step / w) === index) {
      if (w > 1) mergeInto(bs[lo], p);
      else if (bs[lo].seq < p.seq) bs[lo] = p;
      return;
    }
    bs.splice(lo, 0, p);
  }

  shrink() {
    while (this.buckets.length > 2 * this.target) {
      this.width *= 2;
      const w = this.width;
      const merged = [];
      for (const b of this.buckets) {
        const last = merged[merged.length - 1];
        if (last && Math.floor(last.step / w) === Math.floor(b.step / w)) mergeInto(last, b);
        else merged.push(b);
      }
      this.buckets = merged;
    }
  }

  /** Points in the series (as far as its buckets count them). */
  count() {
    let n = 0;
    for (const b of this.buckets) n += b.count;
    return n;
  }
}

// ---------------------------------------------------------------- what a chart draws

/**
 * The table uPlot draws for some runs' series of one metric: x, then per run min, max,
 * value (smoothed when asked) and the ±∞ markers. NaN and values a log axis cannot show
 * are gaps (null); x values a run lacks are `undefined`, which uPlot spans. Also per run
 * the bucket at each x, for the legend.
 */
function plotTable(seriesList, view) {
  const xOf = view.x === 'time'
    ? (b) => b.ts / 1e6
    : view.x === 'elapsed'
      ? (b, first) => (b.ts - first.ts) / 1e6
      : (b) => b.step;
  const xs = seriesList.map((s) => {
    const bs = s ? s.buckets : [];
    const out = new Array(bs.length);
    let prev = -Infinity;
    for (let i = 0; i < bs.length; i++) {
      // Time axes must not go back (a repeated step can carry an older time).
      const x = Math.max(prev, xOf(bs[i], bs[0]));
      out[i] = x;
      prev = x;
    }
    return out;
  });
  let x;
  if (xs.length === 1) x = xs[0];
  else {
    const all = new Set();
    for (const a of xs) for (const v of a) all.add(v);
    x = Array.from(all).sort((a, b) => a - b);
  }
  const len = x.length;
  const index = xs.length === 1 ? null : new Map(Array.from(x, (v, i) => [v, i]));

  // The finite range (positive only on a log axis), to clip ±∞ just past it.
  const usable = view.log ? (v) => Number.isFinite(v) && v > 0 : Number.isFinite;
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of seriesList) {
    for (const b of s ? s.buckets : []) {
      for (const v of [b.min, b.max, b.value]) if (usable(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
  }
  if (lo > hi) { lo = view.log ? 1 : 0; hi = view.log ? 10 : 1; }
  const span = hi - lo || Math.abs(hi) || 1;
  const top = view.log ? hi * 2 : hi + 0.08 * span;
  const bottom = view.log ? lo / 2 : lo - 0.08 * span;
  const shown = (v) => {
    if (v === Infinity) return top;
    if (v === -Infinity) return bottom;
    return usable(v) ? v : null;
  };

  const alpha = Math.min(0.999, Math.max(0, view.smoothing || 0));
  const table = [x];
  const buckets = [];
  let infinities = 0;
  seriesList.forEach((s, r) => {
    const fill = index ? undefined : null;
    const min = new Array(len).fill(fill);
    const max = new Array(len).fill(fill);
    const value = new Array(len).fill(fill);
    const inf = new Array(len).fill(null);
    const at = new Array(len);
    let ema = 0;
    let seen = 0;
    const bs = s ? s.buckets : [];
    for (let i = 0; i < bs.length; i++) {
      const b = bs[i];
      const j = index ? index.get(xs[r][i]) : i;
      at[j] = b;
      min[j] = shown(b.min);
      max[j] = shown(b.max);
      let v = b.value;
      if (alpha > 0 && Number.isFinite(v)) {
        ema = ema * alpha + (1 - alpha) * v;
        seen += 1;
        v = ema / (1 - alpha ** seen);   // debiased, as TensorBoard does
      }
      value[j] = shown(v);
      if (b.value === Infinity || b.value === -Infinity) { inf[j] = value[j]; infinities += 1; }
      else if (b.max === Infinity) { inf[j] = top; infinities += 1; }
      else if (b.min === -Infinity) { inf[j] = bottom; infinities += 1; }
    }
    table.push(min, max, value, inf);
    buckets.push(at);
  });
  return { table, buckets, infinities, top: hi };
}

// ---------------------------------------------------------------- one chart

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || '#888';
}

function withAlpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
}

/** A run's colour as a small square (set through the CSSOM: the CSP allows no inline style). */
export function swatch(color) {
  const el = h('span', { class: 'swatch', 'aria-hidden': 'true' });
  el.style.background = color;
  return el;
}

/**
 * One chart of one metric: for one run (the run page) or several overlaid (the compare
 * page; `runs` gives each a label and a colour). `draw(seriesList)` hands it the series,
 * in the order of `runs`.
 */
export class MetricChart {
  constructor(name, runs, view) {
    this.name = name;
    this.runs = runs;
    this.view = view;
    this.u = null;
    this.zoomed = false;
    this.last = null;               // the plot table last drawn
    this.plot = h('div', { class: 'chart-plot' });
    this.note = h('span', { class: 'chart-note', dataset: { role: 'note' } });
    this.legendRows = runs.map((run) => {
      const value = h('span', { class: 'mono' });
      const row = h('div', { class: 'chart-legend-row' }, swatch(run.color), run.label ? h('span', { class: 'mono label' }, run.label) : null, value);
      return { row, value };
    });
    this.xText = h('span', { class: 'muted mono' });
    this.el = h('figure', { class: 'chart', dataset: { metric: name } },
      h('figcaption', { class: 'chart-head' }, h('span', { class: 'mono chart-title' }, name), this.note),
      this.plot,
      h('div', { class: 'chart-legend', 'aria-live': 'off' }, this.xText, this.legendRows.map((r) => r.row)));
  }

  /** Makes the uPlot instance (when first on screen, and again when the axes change). */
  create() {
    this.destroy();
    const muted = cssVar('--muted');
    const border = cssVar('--border');
    const axis = { stroke: muted, grid: { stroke: border, width: 1 }, ticks: { stroke: border, width: 1 }, font: '11px system-ui, sans-serif' };
    const series = [{ label: this.view.x }];
    const bands = [];
    this.runs.forEach((run, r) => {
      const base = 1 + 4 * r;
      series.push(
        { label: `${run.label || this.name} min`, stroke: withAlpha(run.color, 0.45), width: 1, points: { show: false } },
        { label: `${run.label || this.name} max`, stroke: withAlpha(run.color, 0.45), width: 1, points: { show: false } },
        { label: run.label || this.name, stroke: run.color, width: 1.5, points: { show: false } },
        { label: `${run.label || this.name} ±∞`, stroke: INF_COLOR, fill: INF_COLOR, width: 0, paths: () => null, points: { show: true, size: 6, fill: INF_COLOR, stroke: INF_COLOR } },
      );
      bands.push({ series: [base + 1, base], fill: withAlpha(run.color, 0.12) });
    });
    const width = Math.max(120, this.plot.clientWidth || 300);
    this.u = new uPlot({
      width,
      height: HEIGHT,
      legend: { show: false },
      cursor: { drag: { x: true, y: false }, points: { size: 5 } },
      scales: { x: { time: this.view.x === 'time' }, y: { distr: this.view.log ? 3 : 1 } },
      axes: [
        { ...axis, size: 30, space: 60 },
        { ...axis, size: yAxisSize, values: (u, splits) => splits.map(tickLabel) },
      ],
      series,
      bands,
      hooks: {
        setSelect: [(u) => { if (u.select.width > 0) this.zoomed = true; }],
        setCursor: [(u) => this.legend(u.cursor.idx)],
        draw: [() => this.painted()],
      },
    }, [[]].concat(series.slice(1).map(() => [])), this.plot);
    this.u.over.addEventListener('dblclick', () => { this.zoomed = false; });
    this.u.over.addEventListener('mouseleave', () => this.legend(null));
    this.width = width;
  }

  draw(seriesList) {
    if (!this.u) this.create();
    const plot = plotTable(seriesList, this.view);
    this.last = plot;
    this.u.setData(plot.table, !this.zoomed);
    this.note.textContent = plot.infinities
      ? `${plot.infinities} ±∞ point${plot.infinities === 1 ? '' : 's'} clipped (marked)`
      : '';
    // What a test (or a curious user) reads: the last point drawn of the first run.
    const x = plot.table[0];
    const values = plot.table[3];
    this.el.dataset.points = String(x.length);
    if (x.length) {
      this.el.dataset.lastX = String(x[x.length - 1]);
      this.el.dataset.lastValue = String(values[values.length - 1]);
      this.el.dataset.yMax = String(plot.top);
    }
    this.legend(this.u.cursor.idx);
  }

  /** Tells the page the newest point of the first run now on the canvas. */
  painted() {
    const at = this.last ? this.last.buckets[0] : [];
    let b = null;
    for (let i = at.length - 1; i >= 0 && !b; i--) b = at[i] || null;
    if (b) this.el.dispatchEvent(new CustomEvent('chart-drawn', { bubbles: true, detail: { step: b.step, ts: b.ts } }));
  }

  /** The legend: at the cursor, or each run's last point when the cursor is away. */
  legend(idx) {
    const plot = this.last;
    if (!plot) return;
    const x = plot.table[0];
    const hovering = idx !== null && idx !== undefined && idx >= 0 && idx < x.length;
    const xLabel = this.view.x === 'step' ? 'step' : this.view.x === 'time' ? '' : 's';
    const xText = (v) => (this.view.x === 'time' ? new Date(v * 1000).toLocaleTimeString() : `${xLabel} ${formatValue(v)}`);
    this.xText.textContent = hovering ? xText(x[idx]) : 'last';
    this.legendRows.forEach(({ value }, r) => {
      let b = null;
      if (hovering) b = plot.buckets[r][idx];
      else {
        const at = plot.buckets[r];
        for (let i = at.length - 1; i >= 0 && !b; i--) b = at[i] || null;
      }
      if (!b) { value.textContent = '–'; return; }
      let text = formatValue(b.value);
      if (!hovering) text += ` @ step ${b.step}`;
      if (b.count > 1) text += `  (${b.count} pts, min ${formatValue(b.min)} @ ${b.minStep}, max ${formatValue(b.max)} @ ${b.maxStep})`;
      value.textContent = text;
    });
  }

  resize() {
    if (!this.u) return;
    const width = Math.max(120, this.plot.clientWidth);
    if (width !== this.width) { this.width = width; this.u.setSize({ width, height: HEIGHT }); }
  }

  destroy() {
    if (this.u) { this.u.destroy(); this.u = null; }
  }
}

// ---------------------------------------------------------------- the controls

/** The view of the charts: x axis, log y, smoothing; kept in this browser. */
export function loadView(defaults) {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}') || {}; } catch { saved = {}; }
  return { x: 'step', log: false, smoothing: 0, sort: 'recent', ...defaults, ...saved };
}

function saveView(view) {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({ log: view.log, smoothing: view.smoothing, sort: view.sort, x: view.x }));
}

/**
 * The toolbar of a set of charts: x axis (`axes`: e.g. step / time), log y, the EMA
 * smoothing slider. `onChange(what)` is told 'axes' (charts must be made again) or
 * 'data' (redrawn).
 */
export function chartControls(view, axes, onChange) {
  if (!axes.some(([k]) => k === view.x)) view.x = axes[0][0];
  const axisButtons = axes.map(([key, label]) => h('button', {
    type: 'button', class: `toggle${view.x === key ? ' on' : ''}`, 'aria-pressed': String(view.x === key), dataset: { axis: key },
    onclick: () => {
      view.x = key;
      for (const b of axisButtons) { b.classList.toggle('on', b.dataset.axis === key); b.setAttribute('aria-pressed', String(b.dataset.axis === key)); }
      saveView(view); onChange('axes');
    },
  }, label));
  const log = h('button', {
    type: 'button', class: `toggle${view.log ? ' on' : ''}`, 'aria-pressed': String(view.log), dataset: { role: 'log' },
    onclick: () => {
      view.log = !view.log;
      log.classList.toggle('on', view.log); log.setAttribute('aria-pressed', String(view.log));
      saveView(view); onChange('axes');
    },
  }, 'log y');
  const amount = h('span', { class: 'mono muted smoothing-value' }, view.smoothing.toFixed(2));
  const slider = h('input', {
    type: 'range', min: '0', max: '0.99', step: '0.01', value: String(view.smoothing),
    'aria-label': 'smoothing (exponential moving average)', dataset: { role: 'smoothing' },
  });
  slider.addEventListener('input', () => {
    view.smoothing = Number(slider.value);
    amount.textContent = view.smoothing.toFixed(2);
    saveView(view); onChange('data');
  });
  return [
    h('span', { class: 'segmented', role: 'group', 'aria-label': 'x axis' }, h('span', { class: 'muted' }, 'x:'), axisButtons),
    log,
    h('label', { class: 'smoothing' }, h('span', { class: 'muted' }, 'smoothing'), slider, amount),
  ];
}

// ---------------------------------------------------------------- the run page's charts

/**
 * The run page's charts, live: `snapshot(metrics)` (the feed's snapshot.metrics) and
 * `records(records)` (a batch's metric records) feed the series; charts are made when
 * first on screen, redrawn while on screen as often as drawing's share of the main
 * thread allows (at most once per frame), ordered by the most recently updated first
 * (or by name).
 */
export class ChartPanel {
  constructor() {
    this.view = loadView({});
    this.entries = new Map();       // name → { series, chart, dirty, visible, drawnAt, cost (ms, EMA) }
    this.frame = 0;
    this.resort = true;
    this.hovered = false;
    this.open = true;
    this.count = h('span', { class: 'muted', dataset: { role: 'metric-count' } });
    const sort = h('select', { 'aria-label': 'order of the charts', dataset: { role: 'sort' } },
      h('option', { value: 'recent', selected: this.view.sort === 'recent' }, 'recently updated first'),
      h('option', { value: 'name', selected: this.view.sort === 'name' }, 'by name'));
    sort.addEventListener('change', () => { this.view.sort = sort.value; saveView(this.view); this.resort = true; this.schedule(); });
    this.toggle = h('button', { type: 'button', class: 'disclosure', 'aria-expanded': 'true' }, 'Metrics');
    this.toggle.addEventListener('click', () => {
      this.open = !this.open;
      this.toggle.setAttribute('aria-expanded', String(this.open));
      this.grid.hidden = !this.open;
      this.markAll();
    });
    this.grid = h('div', { class: 'chart-grid' });
    this.el = h('section', { class: 'charts', hidden: true, dataset: { role: 'charts' }, 'aria-label': 'metrics' },
      h('div', { class: 'toolbar' }, this.toggle, this.count,
        chartControls(this.view, [['step', 'step'], ['time', 'time']], (what) => this.changed(what)),
        h('span', { class: 'spacer' }), sort),
      this.grid);
    this.grid.addEventListener('pointerenter', () => { this.hovered = true; });
    this.grid.addEventListener('pointerleave', () => { this.hovered = false; });
    this.visibility = new IntersectionObserver((seen) => {
      for (const e of seen) {
        const entry = this.entries.get(e.target.dataset.metric);
        if (!entry) continue;
        entry.visible = e.isIntersecting;
        if (entry.visible) this.schedule();
      }
    }, { root: this.el, rootMargin: '200px' });
    // Sizes are applied in the next frame (resizing inside the observer's callback
    // would make it fire again in the same frame).
    this.resized = false;
    this.sizes = new ResizeObserver(() => { this.resized = true; this.schedule(); });
    this.sizes.observe(this.grid);
    this.ticker = setInterval(() => {
      if (this.view.sort === 'recent' && !this.hovered) { this.resort = true; this.schedule(); }
    }, RESORT_MS);
  }

  entry(name) {
    let entry = this.entries.get(name);
    if (!entry) {
      const chart = new MetricChart(name, [{ label: '', color: PALETTE[0] }], this.view);
      entry = { series: new Series(), chart, dirty: true, visible: false, drawnAt: -Infinity, cost: 0 };
      this.entries.set(name, entry);
      this.grid.append(chart.el);
      this.visibility.observe(chart.el);
      this.resort = true;
      this.el.hidden = false;
      this.count.textContent = `(${this.entries.size})`;
    }
    return entry;
  }

  /** The feed's snapshot: every series as of the snapshot (replacing what was held). */
  snapshot(metrics) {
    for (const [name, wire] of Object.entries(metrics || {})) {
      const entry = this.entry(name);
      entry.series = Series.from(wire);
      entry.dirty = true;
    }
    for (const [name, entry] of this.entries) {
      if (!metrics || !(name in metrics)) { entry.series = new Series(); entry.dirty = true; }
    }
    this.resort = true;
    this.schedule();
  }

  /** A batch's metric records. */
  records(records) {
    for (const r of records) {
      for (const [name, v] of Object.entries(r.values)) {
        const entry = this.entry(name);
        entry.series.add(r.step, r.ts, metricValue(v), r.seq);
        entry.dirty = true;
      }
    }
    this.schedule();
  }

  changed(what) {
    for (const e of this.entries.values()) {
      if (what === 'axes') e.chart.destroy();
      e.drawnAt = -Infinity;        // the user is waiting: draw now
    }
    this.markAll();
  }

  markAll() {
    for (const e of this.entries.values()) e.dirty = true;
    this.schedule();
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  async render() {
    this.frame = 0;
    if (this.resort) this.order();
    if (!this.open) return;
    if (this.resized) {
      this.resized = false;
      for (const e of this.entries.values()) e.chart.resize();
    }
    // The charts drawn longest ago first, each once its interval has passed, until the
    // frame's budget is spent; the rest wait for a later frame. uPlot paints in a
    // microtask after setData: awaiting one lets it, so the budget and a chart's cost
    // count the painting too (all of it still within this frame's task).
    const start = performance.now();
    const entries = [...this.entries.values()];
    const onScreen = entries.reduce((n, e) => n + (e.visible ? 1 : 0), 0);
    const due = entries.filter((e) => e.dirty && e.visible).sort((a, b) => a.drawnAt - b.drawnAt);
    for (const e of due) {
      const now = performance.now();
      if (now - start > FRAME_BUDGET_MS) { this.schedule(); break; }
      const interval = Math.min(MAX_REDRAW_MS, Math.max(MIN_REDRAW_MS, (onScreen * e.cost) / DRAW_SHARE));
      if (now - e.drawnAt < interval) { this.schedule(); continue; }
      e.dirty = false;
      e.drawnAt = now;
      e.chart.draw([e.series]);
      await null;
      const took = performance.now() - now;
      e.cost = e.cost ? 0.8 * e.cost + 0.2 * took : took;
    }
  }

  order() {
    this.resort = false;
    const sorted = [...this.entries].sort(this.view.sort === 'recent'
      ? ([an, a], [bn, b]) => (b.series.updated - a.series.updated) || byName(an, bn)
      : ([an], [bn]) => byName(an, bn));
    const current = [...this.grid.children];
    if (sorted.every(([, e], i) => current[i] === e.chart.el)) return;
    this.grid.append(...sorted.map(([, e]) => e.chart.el));
  }

  destroy() {
    if (this.frame) cancelAnimationFrame(this.frame);
    clearInterval(this.ticker);
    this.visibility.disconnect();
    this.sizes.disconnect();
    for (const e of this.entries.values()) e.chart.destroy();
  }
}
