// Metric charts against a real `athanor up`: the run page's charts live under a
// metric_storm (10 series at 1000 steps/s for 20 s) with no task of the page's main
// thread taking more than 100 ms of its CPU time, and each chart ending on the series' exact last point (and
// printing how long after emission the newest point was painted); the
// comparison of three sweeps (overlaid charts naming the runs, the differing config
// field highlighted, the results side by side); screenshots of the charts (those of the
// comparison are command.test.mjs's, of three training runs).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { up, browser, startRun, waitFor, traceMainThread, describeTasks, SCREENSHOTS } from './harness.mjs';

let athanor;
let chromium;
before(async () => { athanor = await up(); chromium = await browser(); });
after(async () => { await chromium?.close(); await athanor?.stop(); });

/** MetricStorm::value (workers/src/builtin/metric_storm.rs), without a spike. */
const stormValue = (i, s) => (1 + i) / (1 + s / 100) + 0.05 * Math.sin(s / 10 + i);

/** Opens a page of the UI; with `trace`, its main thread is traced (traceMainThread). */
async function openPage(path, { trace = false, ...options } = {}) {
  const page = await chromium.newPage({ viewport: { width: 1280, height: 900 }, ...options });
  const tracing = trace ? await traceMainThread(page, athanor.url) : null;
  // Each paint of a chart: [metric, newest step drawn, its ts (µs), when painted (ms)].
  await page.addInitScript(() => {
    window.__paints = [];
    document.addEventListener('chart-drawn', (e) => {
      window.__paints.push([e.target.dataset.metric, e.detail.step, e.detail.ts, performance.timeOrigin + performance.now()]);
    });
  });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
  await page.goto(`${athanor.url}/${path}`);
  return { page, problems, tracing };
}

const METRICS = 10;
const STEPS = 20_000;
const RATE = 1000;

test('the run page charts a metric storm live, responsive, ending on each exact last point', { timeout: 180_000 }, async () => {
  const id = await startRun(athanor.url, 'metric_storm', { metrics: METRICS, steps: STEPS, steps_per_second: RATE });
  const { page, problems, tracing } = await openPage(`#/runs/${id}`, { trace: true });
  const chart = (i) => page.locator(`figure.chart[data-metric="m${i}"]`);
  // Live: m0's last drawn step moves on while the run goes.
  const seen = [];
  let samples = 0;
  await waitFor('the run to end on the page', async () => {
    const last = await chart(0).getAttribute('data-last-x', { timeout: 1000 }).catch(() => null);
    if (last !== null && seen[seen.length - 1] !== last) seen.push(last);
    samples += 1;
    return (await page.locator('[data-role=conn]').textContent()) === 'ended';
  }, 120_000);
  const tasks = await tracing.stop();
  console.log(`tasks over 50 ms: ${describeTasks(tasks)}; m0's last step seen at ${seen.length} values over ${samples} samples`);
  assert.ok(seen.length >= 10, `m0 redrawn with ${seen.length} different last steps: ${seen}`);
  assert.ok(seen.map(Number).every((s, i, a) => i === 0 || s > a[i - 1]), `${seen}`);
  assert.ok(tasks.every((t) => t.cpu <= 100), `tasks over 100 ms of CPU: ${describeTasks(tasks, 100)}`);
  // One chart per series, in order (all updated together: by name).
  assert.deepEqual(await page.locator('figure.chart').evaluateAll((els) => els.map((e) => e.dataset.metric)),
    Array.from({ length: METRICS }, (_, i) => `m${i}`));
  for (let i = 0; i < METRICS; i++) {
    await chart(i).scrollIntoViewIfNeeded();
    await waitFor(`m${i} drawn to its end`, async () => (await chart(i).getAttribute('data-last-x')) === String(STEPS - 1));
    assert.equal(await chart(i).getAttribute('data-last-value'), String(stormValue(i, STEPS - 1)), `m${i}`);
    const points = Number(await chart(i).getAttribute('data-points'));
    assert.ok(points > 100 && points <= 1000, `m${i} drew ${points} points`);
  }
  // Each paint names the newest point drawn; how long after its emission it was painted
  // is printed, not asserted (chart-latency.mjs measures it per point).
  const paints = await page.evaluate(() => window.__paints);
  const m0 = paints.filter(([m]) => m === 'm0');
  assert.equal(m0[m0.length - 1][1], STEPS - 1);
  assert.ok(m0.every(([, step], i) => i === 0 || step >= m0[i - 1][1]), 'm0 painted out of order');
  const lags = paints.map(([, , ts, at]) => at - ts / 1000).sort((a, b) => a - b);
  console.log(`${paints.length} paints; newest point emitted → painted: p50 ${lags[Math.floor(lags.length / 2)].toFixed(0)} ms, `
    + `p99 ${lags[Math.floor(lags.length * 0.99)].toFixed(0)} ms`);
  // The legend names the last point; hovering a chart reads the bucket under the cursor.
  assert.match(await chart(3).locator('.chart-legend').textContent(), /@ step 19999/);
  await chart(3).scrollIntoViewIfNeeded();
  const box = await chart(3).locator('.u-over').boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await waitFor('the hover legend', async () => /^step \d+/.test(await chart(3).locator('.chart-legend').textContent()));
  assert.deepEqual(problems, []);
  await page.close();
});

test('a one-step spike stays visible in a wide bucket; log y and smoothing redraw', { timeout: 60_000 }, async () => {
  const id = await startRun(athanor.url, 'metric_storm', { metrics: 2, steps: 5000, steps_per_second: 1000, spike_step: 2500 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const m0 = page.locator('figure.chart[data-metric=m0]');
  await waitFor('m0 drawn to its end', async () => (await m0.getAttribute('data-last-x')) === '4999');
  // 5000 points in at most 1000 buckets: the spike's bucket keeps it as its max.
  assert.ok(Number(await m0.getAttribute('data-points')) <= 1000);
  assert.equal(await m0.getAttribute('data-y-max'), '1000000');
  await page.locator('[data-role=log]').click();
  await waitFor('log y drawn', async () => (await m0.getAttribute('data-last-x')) === '4999');
  await page.locator('[data-role=smoothing]').fill('0.9');
  await waitFor('smoothed', async () => (await m0.getAttribute('data-last-value')) !== String(stormValue(0, 4999)));
  await page.locator('[data-role=smoothing]').fill('0');
  await page.locator('[data-role=log]').click();
  await waitFor('back to raw', async () => (await m0.getAttribute('data-last-value')) === String(stormValue(0, 4999)));
  assert.deepEqual(problems, []);
  await page.close();
});

test('NaN is a gap and ±∞ is clipped and marked (a hand-made feed: no experiment emits them)', async () => {
  const run = {
    id: 'handmade', experiment: 'handmade', instance_id: null, config: {}, status: 'running', error: null,
    worker_id: null, created_at: 1e15, started_at: 1e15, finished_at: null, progress: null, lines: 0, results: 0, batches: 1,
  };
  const bucket = (step, value) => ({ step, ts: 1e15 + step, value, min: value, min_step: step, max: value, max_step: step, count: 1 });
  const snapshot = {
    run, results: {}, tail: [], lines: 0, batches: 1,
    metrics: { weird: { name: 'weird', count: 4, exact: true, width: 1, buckets: [bucket(0, 1), bucket(1, 2), bucket(2, 'NaN'), bucket(3, 3)] } },
  };
  const batch = {
    batch_seq: 1, logs: [], results: [], progress: null, status: 'completed', error: null,
    metrics: [
      { seq: 4, step: 4, ts: 1e15 + 4, values: { weird: 'Infinity' } },
      { seq: 5, step: 5, ts: 1e15 + 5, values: { weird: 2.5 } },
      { seq: 6, step: 6, ts: 1e15 + 6, values: { weird: '-Infinity' } },
      { seq: 7, step: 7, ts: 1e15 + 7, values: { weird: 1.5 } },
    ],
  };
  const end = { status: 'completed', error: null, lines: 0, batches: 2, finished_at: 1e15 + 8 };
  const page = await chromium.newPage({ viewport: { width: 1280, height: 800 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(e.message));
  await page.route('**/api/runs/handmade/events*', (route) => route.fulfill({
    status: 200, headers: { 'content-type': 'text/event-stream' },
    body: `event: snapshot\nid: 1\ndata: ${JSON.stringify(snapshot)}\n\n`
      + `event: batch\nid: 2\ndata: ${JSON.stringify(batch)}\n\n`
      + `event: status\nid: 2\ndata: ${JSON.stringify(end)}\n\n`,
  }));
  await page.goto(`${athanor.url}/#/runs/handmade`);
  const chart = page.locator('figure.chart[data-metric=weird]');
  await waitFor('the chart drawn', async () => (await chart.getAttribute('data-last-x')) === '7');
  assert.equal(await chart.getAttribute('data-points'), '8');
  assert.equal(await chart.getAttribute('data-last-value'), '1.5');
  assert.equal(await chart.getAttribute('data-y-max'), '3');
  assert.equal(await chart.locator('[data-role=note]').textContent(), '2 ±∞ points clipped (marked)');
  // Hovering each point reads its value by name.
  const over = await chart.locator('.u-over').boundingBox();
  const read = async (step) => {
    await page.mouse.move(over.x + (over.width * step) / 7, over.y + over.height / 2);
    await waitFor(`the legend at step ${step}`, async () => (await chart.locator('.chart-legend').textContent()).startsWith(`step ${step}`));
    return chart.locator('.chart-legend-row').textContent();
  };
  assert.equal(await read(2), 'NaN');
  assert.equal(await read(4), '+∞');
  assert.equal(await read(6), '−∞');
  assert.deepEqual(problems, []);
  await page.close();
});

test('the comparison overlays three sweeps, names each run and highlights the config that differs', { timeout: 120_000 }, async () => {
  const iterations = [30, 60, 90];
  const ids = [];
  for (const n of iterations) ids.push(await startRun(athanor.url, 'sweep', { iterations: n, delay_ms: 0 }));
  for (const id of ids) {
    await waitFor(`${id} completed`, async () => (await (await fetch(`${athanor.url}/api/runs/${id}`)).json()).status === 'completed');
  }
  // From the runs list: tick the three, press Compare.
  const { page, problems } = await openPage('#/runs');
  for (const id of ids) await page.getByRole('checkbox', { name: `compare ${id}` }).check();
  await page.getByRole('button', { name: 'Compare 3' }).click();
  await waitFor('the compare page', async () => page.url().includes('/compare?runs='));
  assert.equal(new URL(page.url()).searchParams.get('runs'), ids.join(','));
  const charts = page.locator('figure.chart');
  await waitFor('the three metrics charted', async () => (await charts.count()) === 3);
  assert.deepEqual((await charts.evaluateAll((els) => els.map((e) => e.dataset.metric))).sort(), ['loss', 'lr', 'score']);
  // Each chart names every run in its legend and ends each on its own last iteration.
  const loss = page.locator('figure.chart[data-metric=loss] .chart-legend-row');
  await waitFor('the legend', async () => (await loss.count()) === 3);
  const rows = await loss.allTextContents();
  ids.forEach((id, i) => {
    assert.ok(rows[i].includes(id), rows[i]);
    assert.ok(rows[i].endsWith(`@ step ${iterations[i] - 1}`), rows[i]);
  });
  // Config: iterations differs (highlighted), delay_ms and the experiment do not.
  const row = (field) => page.locator(`[data-role=config] tr[data-field="${field}"]`);
  assert.equal(await row('iterations').getAttribute('data-differs'), 'true');
  assert.match(await row('iterations').getAttribute('class'), /differs/);
  assert.deepEqual(await row('iterations').locator('td').allTextContents(), iterations.map(String));
  assert.equal(await row('delay_ms').getAttribute('data-differs'), 'false');
  assert.equal(await row('experiment').getAttribute('data-differs'), 'false');
  // Results side by side.
  const best = page.locator('[data-role=results] tr[data-field=best_score] td');
  assert.equal(await best.count(), 3);
  // The same page from its URL.
  await page.goto(`${athanor.url}/compare?runs=${ids.join(',')}`);
  await waitFor('the charts again', async () => (await page.locator('figure.chart').count()) === 3);
  assert.deepEqual(problems, []);
  await page.close();
});

test('screenshots of the run page charts in both themes', { timeout: 60_000 }, async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  const storm = await startRun(athanor.url, 'metric_storm', { metrics: 6, steps: 3000, steps_per_second: 0, spike_step: 1800 });
  await waitFor('the storm to complete', async () => (await (await fetch(`${athanor.url}/api/runs/${storm}`)).json()).status === 'completed');
  for (const colorScheme of ['light', 'dark']) {
    const { page, problems } = await openPage(`#/runs/${storm}`, { colorScheme });
    await waitFor('the charts drawn', async () => (await page.locator('figure.chart[data-last-x="2999"]').count()) >= 3);
    const path = join(SCREENSHOTS, `charts-${colorScheme}.png`);
    await page.screenshot({ path });
    console.log(`saved ${path}`);
    assert.deepEqual(problems, []);
    await page.close();
  }
});
