// The run page under a storm: log_storm at 10 000 lines/s for 20 s with the page open.
// No task of the page's main thread takes more than 100 ms of its CPU time, the number of log rows in the DOM
// stays bounded, the total at the end is every line emitted, and with auto-scroll on the
// last line is on screen.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { up, browser, startRun, waitFor, traceMainThread, describeTasks } from './harness.mjs';

const LINES_PER_SECOND = 10_000;
const DURATION_MS = 20_000;
const EXPECTED = (LINES_PER_SECOND * DURATION_MS) / 1000 + 1; // + log_storm's opening line
const MAX_ROWS = 150;

test('the run page stays responsive at 10 000 lines per second', { timeout: 180_000 }, async () => {
  const athanor = await up();
  const chromium = await browser();
  try {
    const page = await chromium.newPage({ viewport: { width: 1280, height: 800 } });
    const tracing = await traceMainThread(page, athanor.url);
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    const id = await startRun(athanor.url, 'log_storm', {
      lines_per_second: LINES_PER_SECOND, duration_ms: DURATION_MS, with_metadata: true,
    });
    await page.goto(`${athanor.url}/#/runs/${id}`);
    let maxRows = 0;
    let samples = 0;
    await waitFor('the run to end on the page', async () => {
      const rows = await page.locator('.viewport .line').count();
      maxRows = Math.max(maxRows, rows);
      samples += 1;
      return (await page.locator('[data-role=conn]').textContent()) === 'ended';
    }, 120_000);
    const tasks = await tracing.stop();
    console.log(`tasks over 50 ms: ${describeTasks(tasks)}; max DOM rows ${maxRows} over ${samples} samples`);
    assert.deepEqual(errors, []);
    assert.ok(samples > 20, `sampled the DOM ${samples} times`);
    assert.ok(tasks.every((t) => t.cpu <= 100), `tasks over 100 ms of CPU: ${describeTasks(tasks, 100)}`);
    assert.ok(maxRows > 0 && maxRows <= MAX_ROWS, `DOM rows peaked at ${maxRows}`);
    const total = `${EXPECTED.toLocaleString('en-US')} lines`;
    await waitFor('the total drawn', async () => (await page.locator('[data-role=total]').textContent()) === total);
    assert.equal(await page.locator('.badge').first().textContent(), 'completed');
    // Auto-scroll is on: the newest line is the last row, inside the viewport.
    const last = page.locator('.viewport .line').last();
    assert.equal(await last.getAttribute('data-seq'), String(EXPECTED - 1));
    const box = await last.boundingBox();
    const viewport = await page.locator('[data-role=viewport]').boundingBox();
    assert.ok(box.y >= viewport.y && box.y + box.height <= viewport.y + viewport.height + 1,
      `last line at ${box.y}..${box.y + box.height}, viewport ${viewport.y}..${viewport.y + viewport.height}`);
    // Scrolling to the top pauses auto-scroll and pages older lines in from the API.
    const firstSeq = async () => Number(await page.locator('.viewport .line').first().getAttribute('data-seq'));
    const newestFirst = await firstSeq();
    await page.locator('[data-role=viewport]').evaluate((el) => { el.scrollTop = 0; });
    await waitFor('older lines paged in', async () => (await firstSeq()) < newestFirst - 1000);
    assert.equal(await page.getByRole('button', { name: '↓ newest' }).isVisible(), true);
    await page.getByRole('button', { name: '↓ newest' }).click();
    await waitFor('back at the newest line', async () =>
      (await page.locator('.viewport .line').last().getAttribute('data-seq')) === String(EXPECTED - 1));
  } finally {
    await chromium.close();
    await athanor.stop();
  }
});
