// How promptly the run page draws metric points, run on demand (not part of `npm test`):
// `metric_storm` runs charted in Chromium against a real `athanor up`, and for every
// point drawn, the time from its emission (its `ts`, taken when the experiment called
// `metrics()`) to the paint of the chart that holds it (the chart's `chart-drawn`
// event, fired after uPlot painted its canvas; the frame is presented at the end of
// that same rendering update). Prints a table: per-point p50 / p99 / max, how often
// each chart was redrawn, and the page's long tasks.
//
//   cd gateway/tests/browser && ATHANOR_BIN=/path/to/athanor node chart-latency.mjs
//
// ATHANOR_BENCH_UI=dir1,dir2   serve the UI's own files (app.js, charts.js, dom.js,
//                              app.css) from each directory in turn instead of from the
//                              binary ("built-in" for the binary's): a before/after of
//                              a UI change in one sitting, without rebuilding
// ATHANOR_BENCH_ROUNDS=n       rounds over the variants (default 1)
// ATHANOR_BENCH_SECONDS=s      length of each run (default 20)
// ATHANOR_BENCH_HEIGHT=px      the window's height (default 900: 9 of 10 charts drawn;
//                              1900 puts all 10 on screen)
//
// Which points: each point's step and ts come from a second reader of the run's feed
// (in this process); a point counts from the first time a chart drawn to its step or
// past it, and only points emitted once the page was drawing (1 s after its first
// chart-drawn event) count. Charts scrolled out of view are not drawn, so their points
// are not counted: the table says how many charts were drawn. Worker, gateway, browser
// and this script share the machine's clock.

import { readFileSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { up, browser, startRun, waitFor, observeLongTasks, longTasks as longTasksOf } from './harness.mjs';

const SECONDS = Number(process.env.ATHANOR_BENCH_SECONDS || 20);
const ROUNDS = Number(process.env.ATHANOR_BENCH_ROUNDS || 1);
const VARIANTS = (process.env.ATHANOR_BENCH_UI || 'built-in').split(',').map((v) => v.trim()).filter(Boolean);
const HEIGHT = Number(process.env.ATHANOR_BENCH_HEIGHT || 900);
const SCENARIOS = [
  { metrics: 10, rate: 1000 },
  { metrics: 1, rate: 10 },
];
const UI_FILES = { 'app.js': 'text/javascript', 'charts.js': 'text/javascript', 'dom.js': 'text/javascript', 'app.css': 'text/css' };

/**
 * Every metric record's step → ts (µs) of run `id`, from its feed, until `signal`; and
 * for those that came in a batch, step → when this reader had it (ms).
 */
async function readEmissions(url, id, tsOf, receivedAt, signal) {
  const response = await fetch(`${url}/api/runs/${id}/events`, { signal });
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = 'message';
        let data = '';
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data += line.slice(5).trimStart();
        }
        if (event === 'batch') {
          const now = performance.timeOrigin + performance.now();
          for (const r of JSON.parse(data).metrics || []) { tsOf.set(r.step, r.ts); receivedAt.set(r.step, now); }
        }
        if (event === 'snapshot') {
          for (const series of Object.values(JSON.parse(data).metrics || {})) {
            if ((series.width || 1) === 1) for (const b of series.buckets) tsOf.set(b.step, b.ts);
          }
        }
      }
    }
  } catch (e) {
    if (!signal.aborted) throw e;
  }
}

const quantile = (sorted, q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : NaN);

async function measure(athanor, chromium, variant, { metrics, rate }) {
  const steps = rate * SECONDS;
  const page = await chromium.newPage({ viewport: { width: 1280, height: HEIGHT } });
  await observeLongTasks(page);
  await page.addInitScript(() => {
    window.__drawn = [];
    document.addEventListener('chart-drawn', (e) => {
      window.__drawn.push([e.target.dataset.metric, e.detail.step, performance.timeOrigin + performance.now()]);
    });
  });
  if (variant !== 'built-in') {
    const dir = resolve(variant);
    await page.route(/\/ui\/(app\.js|charts\.js|dom\.js|app\.css)$/, (route) => {
      const name = new URL(route.request().url()).pathname.split('/').pop();
      const path = join(dir, name);
      if (!existsSync(path)) return route.continue();
      return route.fulfill({ status: 200, contentType: UI_FILES[name], body: readFileSync(path, 'utf8') });
    });
  }
  const id = await startRun(athanor.url, 'metric_storm', { metrics, steps, steps_per_second: rate, log_steps: false });
  const tsOf = new Map();
  const receivedAt = new Map();
  const stop = new AbortController();
  const reading = readEmissions(athanor.url, id, tsOf, receivedAt, stop.signal);
  await page.goto(`${athanor.url}/#/runs/${id}`);
  await waitFor('the run to end on the page', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended', (SECONDS + 60) * 1000);
  // The charts that were drawn at all, each to the last step.
  await waitFor('the drawn charts to reach the last step', async () => page.evaluate((last) => {
    const drawn = new Set(window.__drawn.map(([m]) => m));
    return [...drawn].every((m) => document.querySelector(`figure.chart[data-metric="${m}"]`)?.dataset.lastX === String(last));
  }, steps - 1), 15_000);
  await waitFor('every point read from the feed', async () => tsOf.size >= steps, 15_000);
  stop.abort();
  await reading;
  const drawn = await page.evaluate(() => window.__drawn);
  const tasks = (await longTasksOf(page)).map((t) => t.duration);
  await page.close();

  const liveFrom = (drawn.length ? drawn[0][2] : 0) + 1000;
  const latencies = [];
  const lastOf = new Map();
  const draws = new Map();
  for (const [metric, step, at] of drawn) {
    draws.set(metric, (draws.get(metric) || 0) + 1);
    const last = lastOf.get(metric) ?? -1;
    for (let s = last + 1; s <= step; s++) {
      const ts = tsOf.get(s);
      if (ts !== undefined && ts / 1000 >= liveFrom) latencies.push(at - ts / 1000);
    }
    if (step > last) lastOf.set(metric, step);
  }
  latencies.sort((a, b) => a - b);
  const feed = [];
  for (const [step, at] of receivedAt) {
    const ts = tsOf.get(step);
    if (ts / 1000 >= liveFrom) feed.push(at - ts / 1000);
  }
  feed.sort((a, b) => a - b);
  const perChart = [...draws.values()].reduce((a, b) => a + b, 0) / Math.max(1, draws.size) / SECONDS;
  return {
    charts: `${draws.size} of ${metrics}`,
    points: latencies.length,
    feed: quantile(feed, 0.5),
    p50: quantile(latencies, 0.5),
    p99: quantile(latencies, 0.99),
    max: latencies[latencies.length - 1],
    redraws: perChart,
    longTasks: tasks.length,
    longest: Math.max(0, ...tasks),
  };
}

const athanor = await up();
const chromium = await browser();
const rows = [];
try {
  for (let round = 1; round <= ROUNDS; round++) {
    for (const scenario of SCENARIOS) {
      for (const variant of VARIANTS) {
        const r = await measure(athanor, chromium, variant, scenario);
        const row = `| ${scenario.metrics} × ${scenario.rate} steps/s | ${variant} | ${round} | ${r.charts} | ${r.points} | ${r.feed.toFixed(0)} | `
          + `${r.p50.toFixed(0)} | ${r.p99.toFixed(0)} | ${r.max.toFixed(0)} | ${r.redraws.toFixed(1)} | `
          + `${r.longTasks}, ${r.longest.toFixed(0)} ms |`;
        console.error(row);
        rows.push(row);
      }
    }
  }
} finally {
  await chromium.close();
  await athanor.stop();
}
console.log(`metric_storm runs of ${SECONDS} s, window 1280 × ${HEIGHT}; ms from a point's emission to: this script's feed reader `
  + '(feed p50), the paint of its chart (p50, p99, max)\n');
console.log('| series × rate | UI | round | charts drawn | points | feed p50 | p50 | p99 | max | redraws/s per chart | long tasks > 50 ms (count, longest) |');
console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
for (const row of rows) console.log(row);
