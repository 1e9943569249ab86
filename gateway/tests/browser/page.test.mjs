// The UI's pages against a real `athanor up`: run output shown as text, the cancel
// button, deleting a finished run, the new-run form showing the API's message, a reload mid-run, the live runs
// list, the banner while run output is not being stored, and the screenshots of the run page in both themes.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { up, browser, startRun, runStatus, waitFor, SCREENSHOTS } from './harness.mjs';

let athanor;
let chromium;
before(async () => { athanor = await up(); chromium = await browser(); });
after(async () => { await chromium?.close(); await athanor?.stop(); });

async function openPage(path, options = {}) {
  const page = await chromium.newPage({ viewport: { width: 1280, height: 760 }, ...options });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('dialog', async (d) => { problems.push(`dialog: ${d.message()}`); await d.dismiss(); });
  await page.goto(`${athanor.url}/${path}`);
  return { page, problems };
}

const status = (page) => page.locator('.run-head .badge').textContent();

test('whatever a run prints is shown as text, never run', async () => {
  const payload = '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2;alert(2)</script>'
    + '<b>bold?</b> \u001b[31mred\u001b[0m';
  const id = await startRun(athanor.url, 'echo', { message: payload, count: 3 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const lines = page.locator('.viewport .line .msg');
  assert.equal(await lines.count(), 3);
  // The ANSI colour is rendered; the markup is text.
  assert.equal(await lines.first().textContent(), payload.replace('\u001b[31m', '').replace('\u001b[0m', ''));
  assert.equal(await page.locator('.viewport .line .msg .fg31').first().textContent(), 'red');
  // Metadata, in the detail pane.
  await page.locator('.viewport .line').first().click();
  assert.ok((await page.locator('[data-role=detail]').textContent()).includes(JSON.stringify(payload)));
  // Results: the payload is a key and a value, in the tree and as raw JSON.
  await page.locator('.results .twisty').first().click();
  const results = await page.locator('[data-role=results]').textContent();
  assert.ok(results.includes(payload.slice(0, 40)), results);
  await page.getByRole('button', { name: 'raw JSON' }).click();
  assert.ok((await page.locator('[data-role=results] pre').textContent()).includes(JSON.stringify(payload).slice(1, 40)));
  // Nothing was injected or executed anywhere.
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  assert.equal(await page.locator('main img, main script, main b').count(), 0);
  // The runs list shows it too, still as text.
  await page.goto(`${athanor.url}/#/runs`);
  await page.locator(`tr[data-run="${id}"]`).waitFor();
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  assert.deepEqual(problems, []);
  await page.close();
});

test('level toggles and search filter the log', async () => {
  const id = await startRun(athanor.url, 'sweep', { iterations: 12, delay_ms: 0 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const messages = () => page.locator('.viewport .line .msg').allTextContents();
  await waitFor('the 12 lines drawn', async () => (await messages()).length === 12);
  await page.locator('[data-role=search]').fill('iteration 1');
  await waitFor('the search', async () => (await messages()).length === 3);
  assert.deepEqual((await messages()).map((m) => m.split(':')[0]), ['iteration 1', 'iteration 10', 'iteration 11']);
  assert.equal(await page.locator('[data-role=total]').textContent(), '3 matching · 12 lines');
  await page.locator('button[data-level=info]').click();
  await waitFor('the level filter', async () => (await messages()).length === 0);
  await page.locator('button[data-level=info]').click();
  await page.locator('[data-role=search]').fill('');
  await waitFor('everything again', async () => (await messages()).length === 12);
  assert.deepEqual(problems, []);
  await page.close();
});

test('searching or toggling a level at the end of a long finished log draws the rows without an error', async () => {
  // Found by a user: with the view scrolled to the end of 10 001 lines, a search that
  // matches a few lines asked for a negative number of rows ("reading 'remove'").
  const id = await startRun(athanor.url, 'log_storm', { lines_per_second: 10_000, duration_ms: 1000 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  await page.locator('[data-role=search]').fill('zzzz-no-such-text');
  await waitFor('no rows', async () => (await page.locator('.viewport .line').count()) === 0);
  await page.locator('[data-role=search]').fill('');
  await waitFor('rows again', async () => (await page.locator('.viewport .line').count()) > 0);
  await page.locator('button[data-level=info]').click();
  await page.locator('button[data-level=info]').click();
  await waitFor('rows again', async () => (await page.locator('.viewport .line').count()) > 0);
  assert.deepEqual(problems, []);
  await page.close();
});

test('a search counts and pages through the whole log, not only the lines in memory', async () => {
  // Found by a user: "196 matching · 10,001 lines" where the API found 2 111 — the
  // count covered the 1 000-line tail the page holds.
  const id = await startRun(athanor.url, 'log_storm', { lines_per_second: 10_000, duration_ms: 1000 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const logs = async (q) => (await fetch(`${athanor.url}/api/runs/${id}/logs?${q}`)).json();
  // Everything but warn: thousands of lines, most of them before the tail in memory.
  const wanted = await logs('level=trace,debug,info,error&count=true&limit=1');
  const inTail = await logs('level=trace,debug,info,error&count=true&limit=1&after=9000');
  assert.ok(wanted.matching > inTail.matching + 2000, `${wanted.matching} matching, ${inTail.matching} in the tail`);
  await page.locator('button[data-level=warn]').click();
  const expected = `${new Intl.NumberFormat('en-US').format(wanted.matching)} matching · 10,001 lines`;
  await waitFor('the whole log counted', async () => (await page.locator('[data-role=total]').textContent()) === expected);
  // Scrolling up pages the older matches in, down to the first.
  const firstSeq = wanted.lines[0].seq;
  const viewport = page.locator('[data-role=viewport]');
  await waitFor('the first match paged in', async () => {
    await viewport.evaluate((el) => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); });
    return Number(await page.locator('.viewport .line').first().getAttribute('data-seq')) === firstSeq;
  });
  const shown = await page.locator('.viewport .line .lvl').allTextContents();
  assert.ok(shown.length > 10 && shown.every((l) => l !== 'WARN'), shown.join(' '));
  // A search and a level together, counted by the gateway as well.
  await page.locator('[data-role=search]').fill('step');
  const both = await logs('level=trace,debug,info,error&q=step&count=true&limit=1');
  await waitFor('the search counted', async () => (await page.locator('[data-role=total]').textContent())
    === `${new Intl.NumberFormat('en-US').format(both.matching)} matching · 10,001 lines`);
  assert.deepEqual(problems, []);
  await page.close();
});

test('the cancel button cancels a running run', async () => {
  const id = await startRun(athanor.url, 'sleepy', { duration_ms: 60_000 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  await waitFor('running', async () => (await status(page)) === 'running');
  await page.locator('[data-role=cancel]').click();
  await waitFor('cancelled on the page', async () => (await status(page)) === 'cancelled');
  // The page runs ahead of the database; the database follows.
  await waitFor('cancelled in the database', async () => (await runStatus(athanor.url, id)).status === 'cancelled');
  assert.equal(await page.locator('[data-role=cancel]').isDisabled(), true);
  // Found by a user: it kept saying "Cancelling…", and focus fell to the page body.
  await waitFor('the button to say so', async () => (await page.locator('[data-role=cancel]').textContent()) === 'Cancelled');
  assert.notEqual(await page.evaluate(() => document.activeElement?.tagName), 'BODY');
  assert.deepEqual(problems, []);
  await page.close();
});

test('a finished run is deleted from its page after a question in place; Keep keeps it', async () => {
  const running = await startRun(athanor.url, 'sleepy', { duration_ms: 60_000 });
  const id = await startRun(athanor.url, 'sweep', { iterations: 3, delay_ms: 0 });
  const { page, problems } = await openPage(`#/runs/${running}`);
  await waitFor('running', async () => (await status(page)) === 'running');
  // No delete while it runs: cancel first.
  assert.equal(await page.locator('[data-role=delete]').isVisible(), false);
  await page.goto(`${athanor.url}/#/runs/${id}`);
  await waitFor('completed', async () => (await status(page)) === 'completed');
  const del = page.locator('[data-role=delete]');
  await waitFor('the delete button', async () => del.isVisible());
  await del.click();
  const question = page.locator('[data-role=delete-question]');
  await waitFor('the question', async () => question.isVisible());
  assert.equal(await question.textContent(),
    'Delete this run, its 3 lines and its results and metrics? This cannot be undone.');
  // Keep: nothing happens, and focus goes back to the button.
  assert.equal(await page.evaluate(() => document.activeElement?.dataset.role), 'delete-keep');
  await page.locator('[data-role=delete-keep]').click();
  assert.equal(await question.isVisible(), false);
  assert.equal(await page.evaluate(() => document.activeElement?.dataset.role), 'delete');
  assert.equal((await runStatus(athanor.url, id)).status, 'completed');
  // Delete for good: back to the runs list, without it; the API says 404.
  await del.click();
  await page.locator('[data-role=delete-confirm]').click();
  await waitFor('the runs list', async () => page.url().endsWith('#/runs'));
  await page.locator(`tr[data-run="${running}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-run="${id}"]`).count(), 0);
  // The footer says what is held (GET /api/stats), as text.
  await waitFor('the footer', async () => /^\d+ runs? · [\d,]+ lines? · database [\d.,]+ MB · stream [\d.,]+ MB \([\d,]+ batches\)$/
    .test(await page.locator('[data-role=stats]').textContent()));
  assert.equal((await fetch(`${athanor.url}/api/runs/${id}`)).status, 404);
  await fetch(`${athanor.url}/api/runs/${running}/cancel`, { method: 'POST' });
  assert.deepEqual(problems, []);
  await page.close();
});

test('the new-run form shows the API message next to an out-of-bounds field, then starts a run', async () => {
  const { page, problems } = await openPage('#/experiments');
  const form = page.locator('form[data-experiment=sweep]');
  await form.locator('input[name=iterations]').fill('0');
  await form.getByRole('button', { name: 'Start run' }).click();
  const error = form.locator('[data-error-for=iterations]');
  await waitFor('the field error', async () => (await error.textContent()) !== '');
  assert.equal(await error.textContent(), 'must be at least 1, got 0');
  assert.ok(page.url().endsWith('#/experiments'));
  await form.locator('input[name=iterations]').fill('2');
  await form.locator('input[name=delay_ms]').fill('0');
  await form.getByRole('button', { name: 'Start run' }).click();
  await waitFor('the run page', async () => page.url().includes('#/runs/'));
  await waitFor('completed', async () => (await status(page)) === 'completed');
  // The total is drawn on the next frame after the status: wait for it.
  await waitFor('the total of 2 lines', async () => (await page.locator('[data-role=total]').textContent()) === '2 lines');
  assert.deepEqual(problems, []);
  await page.close();
});

test('a reload mid-run shows the same state', async () => {
  const id = await startRun(athanor.url, 'sweep', { iterations: 3, delay_ms: 6000 });
  const { page, problems } = await openPage(`#/runs/${id}`);
  const state = async () => ({
    status: await status(page),
    total: await page.locator('[data-role=total]').textContent(),
    progress: await page.locator('[data-role=progress]').textContent(),
    lines: await page.locator('.viewport .line .msg').allTextContents(),
    results: await page.locator('[data-role=results]').textContent(),
  });
  // The first line and its progress report may come in separate batches (the leading
  // edge publishes a line at once; a busy machine can leave the report to the next
  // tick), and each is drawn on a frame of its own: wait for both.
  await waitFor('the first iteration', async () =>
    (await page.locator('[data-role=total]').textContent()) === '1 line'
    && (await page.locator('[data-role=progress]').textContent()) !== '');
  const before = await state();
  assert.equal(before.status, 'running');
  assert.equal(before.progress, '1/3 · iteration 1 of 3');
  await page.reload();
  await waitFor('the page to load the run', async () =>
    (await page.locator('[data-role=total]').textContent()) === '1 line'
    && (await page.locator('[data-role=progress]').textContent()) !== '');
  await waitFor('the results', async () => (await page.locator('[data-role=results]').textContent()).includes('iteration_0'));
  assert.deepEqual(await state(), before);
  assert.deepEqual(problems, []);
  await page.close();
});

test('the runs list follows status changes live', async () => {
  const { page, problems } = await openPage('#/runs');
  await waitFor('the lifecycle feed', async () => (await page.locator('.page .conn').textContent()) === 'live');
  const id = await startRun(athanor.url, 'sweep', { iterations: 3, delay_ms: 300 });
  const badge = page.locator(`tr[data-run="${id}"] .badge`);
  await waitFor('the new run in the list', async () => (await badge.count()) === 1);
  await waitFor('completed in the list', async () => (await badge.textContent()) === 'completed');
  await page.locator('select[name=status]').selectOption('completed');
  await waitFor('the filter', async () => (await page.locator('tbody .badge').allTextContents()).every((s) => s === 'completed'));
  assert.deepEqual(problems, []);
  await page.close();
});

test('screenshots of the run page in both themes', async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  const id = await startRun(athanor.url, 'sweep', { iterations: 40, delay_ms: 150 });
  for (const colorScheme of ['light', 'dark']) {
    const { page, problems } = await openPage(`#/runs/${id}`, { colorScheme });
    await waitFor('some output', async () => (await page.locator('.viewport .line').count()) >= 10);
    await page.locator('.results .twisty').first().click();
    const path = join(SCREENSHOTS, `run-${colorScheme}.png`);
    await page.screenshot({ path });
    console.log(`saved ${path}`);
    assert.deepEqual(problems, []);
    await page.close();
  }
});

test('while the aggregators cannot write, a banner says run output is not being stored; it goes once they can', { timeout: 180_000 }, async () => {
  const stalled = await up({ ATHANOR__GATEWAY__STORAGE_STALL: '1s' });
  const page = await chromium.newPage({ viewport: { width: 1280, height: 760 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`${stalled.url}/`);
  const banner = page.locator('[data-role=held]');
  assert.equal(await banner.isVisible(), false, 'a banner with nothing wrong');
  const id = await startRun(stalled.url, 'log_storm', { lines_per_second: 1000, duration_ms: 4000 });
  // Then another process holds SQLite's write lock until its stdin closes: the
  // aggregator retries and acknowledges nothing (as on a full disk).
  const lock = spawn('python3', ['-c', [
    'import sqlite3, sys',
    'db = sqlite3.connect(sys.argv[1], isolation_level=None)',
    "db.execute('BEGIN IMMEDIATE')",
    "print('locked', flush=True)",
    'sys.stdin.read()',
  ].join('\n'), join(stalled.dataDir, 'athanor.db')], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    const [locked] = await once(lock.stdout, 'data');
    assert.equal(locked.toString().trim(), 'locked');
    // The stats are read at every page change (and every 30 s): go back and forth.
    let onRun = false;
    await waitFor('the banner', async () => {
      if (await banner.isVisible()) return true;
      onRun = !onRun;
      await page.evaluate((hash) => { location.hash = hash; }, onRun ? `#/runs/${id}` : '#/');
      return false;
    }, 60_000);
    const text = await banner.textContent();
    assert.match(text, /^Run output is not being stored: the aggregators have stored nothing for \d+ s while \d+ batches wait \(consumer aggregator\)/);
    assert.equal(await banner.getAttribute('role'), 'alert');
    mkdirSync(SCREENSHOTS, { recursive: true });
    await page.screenshot({ path: join(SCREENSHOTS, 'storage-warning.png') });
    lock.stdin.end();
    // Read every 5 s while it warns.
    await waitFor('the banner to go', async () => !(await banner.isVisible()), 60_000);
    const run = await waitFor('the run to be stored', async () => {
      const r = await runStatus(stalled.url, id);
      return r.status === 'completed' ? r : null;
    }, 60_000);
    assert.equal(run.lines, 4001);
    assert.deepEqual(problems, []);
  } finally {
    lock.kill();
    await page.close();
    await stalled.stop();
  }
});

test('with an API token required, the page asks for it and then works (the run feed with the token, the runs list with feed tokens)', async () => {
  const guarded = await up({ ATHANOR__GATEWAY__API_TOKEN: 's3cret', ATHANOR__GATEWAY__PROTECT_READS: 'true' });
  try {
    const response = await fetch(`${guarded.url}/api/runs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer s3cret' },
      body: JSON.stringify({ experiment: 'sweep', config: { iterations: 3, delay_ms: 100 } }),
    });
    const id = (await response.json()).id;
    const page = await chromium.newPage({ viewport: { width: 1280, height: 760 } });
    const problems = [];
    page.on('pageerror', (e) => problems.push(e.message));
    await page.goto(`${guarded.url}/#/runs/${id}`);
    const field = page.locator('[data-role=token] input');
    await field.waitFor();
    await field.fill('s3cret');
    await page.getByRole('button', { name: 'Use token' }).click();
    await waitFor('completed', async () => (await page.locator('.run-head .badge').textContent()) === 'completed');
    // The total is drawn on the next frame after the status: wait for it.
    await waitFor('the total of 3 lines', async () => (await page.locator('[data-role=total]').textContent()) === '3 lines');
    assert.deepEqual(problems, []);
    await page.close();
  } finally {
    await guarded.stop();
  }
});
