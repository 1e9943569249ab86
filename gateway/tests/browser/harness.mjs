// What every browser test needs: a real `athanor up` (own nats-server, SQLite in a temp
// dir, free port) and Debian's chromium through playwright-core.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const here = new URL('.', import.meta.url).pathname;
const root = resolve(here, '../../..');
export const ATHANOR = process.env.ATHANOR_BIN || join(root, 'target/debug/athanor');
export const NATS_SERVER = process.env.ATHANOR__NATS__SERVER_BIN || join(root, '.tools/venv/bin/nats-server');
export const SCREENSHOTS = join(root, 'docs/screenshots');
export const EXAMPLES = join(root, 'examples');

/**
 * Starts `athanor up` (with `--config configFile` when given); resolves with
 * { url, dataDir, stop() } once its worker is registered.
 */
export async function up(extraEnv = {}, configFile = null) {
  const dataDir = mkdtempSync(join(tmpdir(), 'athanor-ui-'));
  const config = configFile ? ['--config', configFile] : [];
  const child = spawn(ATHANOR, [...config, 'up', '--data-dir', dataDir, '--http-addr', '127.0.0.1:0'], {
    env: { ...process.env, ATHANOR__NATS__SERVER_BIN: NATS_SERVER, RUST_LOG: 'warn', ...extraEnv },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const url = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('athanor up printed no API line in 60 s')), 60_000);
    child.on('exit', (code) => fail(new Error(`athanor up exited with ${code}`)));
    lines.on('line', (line) => {
      const m = line.match(/^\s*API:\s+(http:\/\/\S+)\/api\/experiments/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    });
  });
  const deadline = Date.now() + 30_000;
  const headers = extraEnv.ATHANOR__GATEWAY__API_TOKEN
    ? { authorization: `Bearer ${extraEnv.ATHANOR__GATEWAY__API_TOKEN}` } : {};
  for (;;) {
    const body = await (await fetch(`${url}/api/experiments`, { headers })).json();
    if (body.experiments?.length >= 5) break;
    if (Date.now() > deadline) throw new Error('the worker never registered');
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    url,
    dataDir,
    async stop() {
      const exited = new Promise((ok) => child.on('exit', ok));
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export async function browser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
}

/** POST /api/runs; returns the run id. */
export async function startRun(url, experiment, config) {
  const response = await fetch(`${url}/api/runs`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ experiment, config }),
  });
  const body = await response.json();
  if (response.status !== 201) throw new Error(`run refused: ${JSON.stringify(body)}`);
  return body.id;
}

export async function runStatus(url, id) {
  return (await (await fetch(`${url}/api/runs/${id}`)).json());
}

/** Polls `check` until it returns a truthy value. */
export async function waitFor(what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * Traces the main thread of the renderer that will load `url` (call before `page.goto`):
 * `stop()` ends the trace and resolves with that thread's tasks,
 * [{ start, wall, cpu }] in ms (start since the trace began). `cpu` is the thread's own
 * time: what the page's work blocks the main thread for, whatever else the machine runs
 * (a long task's wall time also counts the moments the renderer waited for a core, and
 * on a loaded two-core machine those reach a second).
 */
export async function traceMainThread(page, url) {
  const cdp = await page.context().newCDPSession(page);
  const events = [];
  cdp.on('Tracing.dataCollected', ({ value }) => { for (const e of value) events.push(e); });
  await cdp.send('Tracing.start', {
    traceConfig: { includedCategories: ['toplevel', 'devtools.timeline', '__metadata'], recordMode: 'recordContinuously' },
    transferMode: 'ReportEvents',
  });
  return {
    async stop() {
      const complete = new Promise((ok) => cdp.once('Tracing.tracingComplete', ok));
      await cdp.send('Tracing.end');
      await complete;
      await cdp.detach();
      const commit = events.find((e) => e.name === 'CommitLoad' && e.args?.data?.url?.startsWith(url));
      if (!commit) throw new Error(`no renderer loaded ${url} in the trace`);
      const main = events.find((e) => e.ph === 'M' && e.name === 'thread_name' && e.pid === commit.pid
        && e.args.name === 'CrRendererMain');
      const origin = events.reduce((min, e) => (e.ts > 0 && e.ts < min ? e.ts : min), Infinity);
      return events
        .filter((e) => e.ph === 'X' && e.name === 'ThreadControllerImpl::RunTask' && e.pid === commit.pid && e.tid === main.tid)
        .map((e) => ({ start: (e.ts - origin) / 1000, wall: e.dur / 1000, cpu: (e.tdur ?? e.dur) / 1000 }));
    },
  };
}

/** "N ms CPU (M ms wall) at S s" for the tasks over `ms` of CPU or wall time. */
export const describeTasks = (tasks, ms = 50) => tasks.filter((t) => t.cpu > ms || t.wall > ms)
  .map((t) => `${t.cpu.toFixed(0)} ms CPU (${t.wall.toFixed(0)} ms wall) at ${(t.start / 1000).toFixed(1)} s`).join(', ');

/**
 * Records the page's main-thread long tasks (over 50 ms) from its first script on;
 * read them with `longTasks(page)`.
 */
export async function observeLongTasks(page) {
  await page.addInitScript(() => {
    window.__longTasks = [];
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) window.__longTasks.push({ start: entry.startTime, duration: entry.duration });
    }).observe({ type: 'longtask', buffered: true });
  });
}

/** The long tasks so far: [{ start, duration }] in ms since the page's start. */
export const longTasks = (page) => page.evaluate(() => window.__longTasks);
