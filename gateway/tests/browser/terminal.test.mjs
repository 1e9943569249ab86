// What programs print, shown as a terminal would — defects a first-time user met: a
// `\r` progress bar run together, OSC 8 hyperlinks as junk, ANSI codes raw in the
// progress message, a traceback collapsed onto one line, a result key `__proto__`
// missing from the raw JSON, "1 lines", and a line detail pane that would not close.
// A command experiment (python3, writing to the events pipe) prints all of it.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { up, browser, startRun, runStatus, waitFor } from './harness.mjs';

const SCRIPT = String.raw`
import json, os, sys
events = os.fdopen(int(os.environ["ATHANOR_EVENTS_FD"]), "w", buffering=1)
def ev(o): events.write(json.dumps(o) + "\n")
ev({"type": "log", "level": "info", "message": "download 10%\r20%\r30% done"})
ev({"type": "log", "level": "info", "message": "see \x1b]8;;https://example.com\x1b\\the docs\x1b]8;;\x1b\\ here"})
ev({"type": "progress", "current": 1, "total": 2, "message": "\x1b[31mred step\x1b[0m"})
ev({"type": "result", "key": "__proto__", "value": {"polluted": True}})
ev({"type": "outcome", "status": "failed", "error": "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom"})
`;

let athanor;
let chromium;
let dir;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'athanor-terminal-'));
  writeFileSync(join(dir, 'terminal.py'), SCRIPT);
  writeFileSync(join(dir, 'athanor.toml'), [
    '[[experiments]]',
    'name = "terminal"',
    'description = "Prints what terminals print"',
    'command = ["python3", "terminal.py"]',
    '',
  ].join('\n'));
  // One run at a time: a second run waits, pending.
  athanor = await up({ ATHANOR__WORKER__MAX_CONCURRENT_RUNS: '1' }, join(dir, 'athanor.toml'));
  chromium = await browser();
});
after(async () => { await chromium?.close(); await athanor?.stop(); rmSync(dir, { recursive: true, force: true }); });

test('a first visit points from the empty runs list to Experiments, whose forms have unique field ids', async () => {
  const page = await chromium.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${athanor.url}/#/runs`);
  const empty = page.locator('[data-role=empty]');
  await empty.waitFor();
  assert.equal(await empty.textContent(), 'No runs yet. Start one from Experiments →');
  await empty.getByRole('link').click();
  await page.locator('form[data-experiment=sleepy]').waitFor();
  const ids = await page.locator('form input[id], form select[id]').evaluateAll((els) => els.map((e) => e.id));
  assert.equal(new Set(ids).size, ids.length, `duplicate ids: ${ids}`);
  // Fields in the declared order, descriptions' `code` as code (echo: message, count,
  // level, repeat, as builtin/echo.rs declares them).
  const echo = page.locator('form[data-experiment=echo]');
  assert.deepEqual(await echo.locator('input[name], select[name]').evaluateAll((els) => els.map((e) => e.name).filter((n) => !n.startsWith('__'))),
    ['message', 'count', 'level', 'repeat']);
  assert.ok(await echo.locator('.muted code').count() >= 1, 'the description\'s `message` as code');
  assert.ok(!(await echo.locator('.muted').first().textContent()).includes('`'));
  // A label focuses its own experiment's field.
  await page.locator('form[data-experiment=sleepy] label', { hasText: 'duration_ms' }).click();
  assert.equal(await page.evaluate(() => document.activeElement.closest('form').dataset.experiment), 'sleepy');
  await page.close();
});

test('a pending run says it waits for a worker and how many are busy, then shows the worker that took it', async () => {
  const busy = await startRun(athanor.url, 'sleepy', { duration_ms: 60_000 });
  await waitFor('the slot taken', async () => (await runStatus(athanor.url, busy)).status === 'running');
  const id = await startRun(athanor.url, 'sweep', { iterations: 2, delay_ms: 100 });
  const page = await chromium.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${athanor.url}/#/runs/${id}`);
  await waitFor('pending', async () => (await page.locator('.run-head .badge').textContent()) === 'pending');
  // How busy the workers that host it are (one worker, its one slot taken).
  await waitFor('how busy the workers are', async () => (await page.locator('[data-role=progress]').textContent())
    === 'waiting for a worker: 1 of 1 hosting it is busy');
  await fetch(`${athanor.url}/api/runs/${busy}/cancel`, { method: 'POST' });
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const worker = (await runStatus(athanor.url, id)).worker_id;
  assert.ok(worker);
  await waitFor('the worker shown', async () => (await page.locator('.kv').textContent()).includes(worker));
  await page.close();
});

test('terminal output is shown as a terminal shows it', async () => {
  const id = await startRun(athanor.url, 'terminal', {});
  const page = await chromium.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`${athanor.url}/#/runs/${id}`);
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  const messages = await waitFor('the lines drawn', async () => {
    const shown = await page.locator('.viewport .line .msg').allTextContents();
    return shown.length >= 2 && shown;
  });
  assert.ok(messages.includes('30% done'), `the newest state of a redrawn line: ${JSON.stringify(messages)}`);
  assert.ok(messages.includes('see the docs here'), `a hyperlink's text only: ${JSON.stringify(messages)}`);
  assert.equal(await page.locator('[data-role=progress]').textContent(), '1/2 · red step');
  const error = page.locator('[data-role=error]');
  assert.equal(await error.textContent(), 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom');
  assert.equal(await error.evaluate((el) => getComputedStyle(el).whiteSpace), 'pre-wrap');
  assert.equal(await page.locator('[data-role=total]').textContent(), `${messages.length} lines`);
  await page.getByRole('button', { name: 'raw JSON' }).click();
  const raw = JSON.parse(await page.locator('[data-role=results] pre').textContent());
  assert.deepEqual(Object.keys(raw), ['__proto__']);
  assert.deepEqual(Object.getOwnPropertyDescriptor(raw, '__proto__').value, { polluted: true });
  // The detail pane opens on a click and closes with its button and with Escape.
  const detail = page.locator('[data-role=detail]');
  await page.locator('.viewport .line').first().click();
  assert.ok(await detail.isVisible());
  await page.getByRole('button', { name: 'Close details' }).click();
  assert.ok(!(await detail.isVisible()));
  await page.locator('.viewport .line').first().click();
  assert.ok(await detail.isVisible());
  await page.keyboard.press('Escape');
  assert.ok(!(await detail.isVisible()));
  assert.deepEqual(problems, []);
  await page.close();
});
