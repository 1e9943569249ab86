// The run page on real networks: over a throttled link (Chromium's own network
// emulation: 1 Mbit/s, 300 ms) it says how far behind it is, skips ahead, and shows the
// run's end within 5 s of it; the feed is compressed; and a connection that stalls
// without closing (a TCP proxy the test controls stops forwarding) is noticed after
// twice the keep-alive and resumed with Last-Event-ID, losing and repeating nothing.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect } from 'node:net';
import { up, browser, startRun, runStatus, waitFor } from './harness.mjs';

let chromium;
before(async () => { chromium = await browser(); });
after(async () => { await chromium?.close(); });

/** Every state the page's connection indicator shows, with when (ms since start). */
async function recordConn(page) {
  await page.addInitScript(() => {
    window.__conn = [];
    const t0 = performance.now();
    const seen = () => {
      const el = document.querySelector('[data-role=conn]');
      const text = el?.textContent;
      if (text && window.__conn.at(-1)?.text !== text) window.__conn.push({ text, at: performance.now() - t0 });
    };
    new MutationObserver(seen).observe(document, { subtree: true, childList: true, characterData: true });
  });
}

test('over a 1 Mbit/s link with 300 ms latency the page says it is behind, skips ahead, and shows the end within 5 s', { timeout: 240_000 }, async () => {
  const athanor = await up();
  try {
    const page = await chromium.newPage({ viewport: { width: 1280, height: 760 } });
    const problems = [];
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    const encodings = [];
    page.on('response', (r) => { if (r.url().includes('/events')) encodings.push(r.headers()['content-encoding'] || 'identity'); });
    await recordConn(page);
    const cdp = await page.context().newCDPSession(page);
    await cdp.send('Network.enable');
    await cdp.send('Network.emulateNetworkConditions', {
      offline: false, latency: 300, downloadThroughput: 125_000, uploadThroughput: 125_000,
    });
    const id = await startRun(athanor.url, 'log_storm', { lines_per_second: 10_000, duration_ms: 20_000 });
    await page.goto(`${athanor.url}/#/runs/${id}`);
    // The run's end, as the API (over loopback, unthrottled) sees it.
    const ended = await waitFor('the run to end', async () => {
      const run = await runStatus(athanor.url, id);
      return run.status === 'completed' ? Date.now() : null;
    }, 120_000);
    const shown = await waitFor('the page to show the end', async () =>
      (await page.locator('.run-head .badge').textContent()) === 'completed'
        && (await page.locator('[data-role=conn]').textContent()) === 'ended' ? Date.now() : null, 60_000);
    const late = (shown - ended) / 1000;
    const states = await page.evaluate(() => window.__conn);
    console.log(`end shown ${late.toFixed(1)} s after the run ended; states: ${states.map((s) => s.text).join(' → ')}; encodings: ${[...new Set(encodings)].join(', ')}`);
    assert.ok(late <= 5, `the end was shown ${late} s after the run's end`);
    assert.ok(states.some((s) => s.text.startsWith('behind ')), 'the page never said it was behind');
    assert.ok(!encodings.includes('identity'), `an uncompressed feed: ${encodings}`);
    assert.equal(await page.locator('[data-role=total]').textContent(), '200,001 lines');
    assert.deepEqual(problems, []);
    await page.close();
  } finally {
    await athanor.stop();
  }
});

/** A TCP proxy to `target` whose open connections can be stalled (nothing forwarded, nothing closed). */
async function stallingProxy(target) {
  const { hostname, port } = new URL(target);
  const connections = new Set();
  const server = createServer((client) => {
    const upstream = connect(Number(port), hostname);
    const link = { stalled: false, client, upstream };
    connections.add(link);
    client.on('data', (d) => { if (!link.stalled) upstream.write(d); });
    upstream.on('data', (d) => { if (!link.stalled) client.write(d); });
    const end = () => { client.destroy(); upstream.destroy(); connections.delete(link); };
    client.on('close', end); upstream.on('close', end);
    client.on('error', end); upstream.on('error', end);
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    /** Stalls every connection open now; later ones pass. */
    stall() { for (const link of connections) link.stalled = true; },
    close() { for (const link of connections) { link.client.destroy(); link.upstream.destroy(); } server.close(); },
  };
}

test('a connection that stalls silently is dropped after twice the keep-alive and resumed without a gap or a repeat', { timeout: 120_000 }, async () => {
  const athanor = await up({ ATHANOR__GATEWAY__KEEP_ALIVE: '1s' });
  const proxy = await stallingProxy(athanor.url);
  try {
    const page = await chromium.newPage({ viewport: { width: 1280, height: 1400 } });
    const problems = [];
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    await recordConn(page);
    const id = await startRun(athanor.url, 'sweep', { iterations: 40, delay_ms: 250 });
    await page.goto(`${proxy.url}/#/runs/${id}`);
    const total = () => page.locator('[data-role=total]').textContent();
    await waitFor('a few lines live', async () => {
      const text = await total();
      return (await page.locator('[data-role=conn]').textContent()) === 'live' && /^[3-9] lines$/.test(text);
    });
    const stalledAt = Date.now();
    proxy.stall();
    await waitFor('the page to notice', async () =>
      (await page.locator('[data-role=conn]').textContent()) === 'reconnecting…', 10_000);
    const noticed = (Date.now() - stalledAt) / 1000;
    await waitFor('the run to end on the page', async () =>
      (await page.locator('[data-role=conn]').textContent()) === 'ended', 60_000);
    const messages = await page.locator('.viewport .line .msg').allTextContents();
    const iterations = messages.map((m) => Number(m.match(/^iteration (\d+):/)?.[1]));
    const states = await page.evaluate(() => window.__conn);
    console.log(`stall noticed after ${noticed.toFixed(1)} s; states: ${states.map((s) => s.text).join(' → ')}`);
    assert.ok(noticed >= 1.5 && noticed <= 5, `noticed after ${noticed} s (keep-alive 1 s)`);
    assert.deepEqual(iterations, Array.from({ length: 40 }, (_, i) => i), 'every line once, in order');
    assert.equal(await total(), '40 lines');
    assert.deepEqual(problems, []);
    await page.close();
  } finally {
    proxy.close();
    await athanor.stop();
  }
});
