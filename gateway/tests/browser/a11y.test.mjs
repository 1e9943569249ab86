// Accessibility: axe-core (npm, pinned) on each page of the UI — the runs list, the
// experiments and their forms, a run's page with its log, results and charts, the
// comparison — in both themes: no serious or critical violation.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { up, browser, startRun, waitFor } from './harness.mjs';

const AXE = createRequire(import.meta.url).resolve('axe-core/axe.min.js');

let athanor;
let chromium;
before(async () => { athanor = await up(); chromium = await browser(); });
after(async () => { await chromium?.close(); await athanor?.stop(); });

/** The serious and critical violations axe finds on the page as it is now. */
async function violations(page) {
  await page.addScriptTag({ path: AXE });
  const found = await page.evaluate(async () => (await window.axe.run(document, {
    resultTypes: ['violations'],
  })).violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' ')) })));
  return found.filter((v) => v.impact === 'serious' || v.impact === 'critical');
}

test('no serious or critical accessibility violation on any page, in either theme', { timeout: 180_000 }, async () => {
  const id = await startRun(athanor.url, 'sweep', { iterations: 5, delay_ms: 0 });
  const other = await startRun(athanor.url, 'sweep', { iterations: 5, delay_ms: 0, });
  const pages = [
    ['runs', '#/runs', (p) => p.locator(`tr[data-run="${id}"]`).waitFor()],
    ['experiments', '#/experiments', (p) => p.locator('form[data-experiment=sweep]').waitFor()],
    ['run', `#/runs/${id}`, (p) => waitFor('the end', async () => (await p.locator('[data-role=conn]').textContent()) === 'ended')],
    ['compare', `compare?runs=${id},${other}`, (p) => p.locator('canvas').first().waitFor()],
  ];
  const report = [];
  for (const scheme of ['light', 'dark']) {
    // bypassCSP: axe is injected as a script of its own; the UI's CSP would refuse it.
    const context = await chromium.newContext({ bypassCSP: true, colorScheme: scheme, viewport: { width: 1280, height: 900 } });
    for (const [name, path, ready] of pages) {
      const page = await context.newPage();
      await page.goto(`${athanor.url}/${path}`);
      await ready(page);
      for (const v of await violations(page)) report.push(`${scheme} ${name}: ${v.impact} ${v.id} (${v.help}) at ${v.nodes.join(', ')}`);
      await page.close();
    }
    await context.close();
  }
  assert.deepEqual(report, []);
});

test('the run page is operable by keyboard and says what it shows', async () => {
  const id = await startRun(athanor.url, 'sweep', { iterations: 3, delay_ms: 0 });
  const page = await chromium.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${athanor.url}/#/runs/${id}`);
  await waitFor('the end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended');
  // Level toggles say whether they are on; the progress bar its values; the status is
  // announced.
  const info = page.locator('button[data-level=info]');
  assert.equal(await info.getAttribute('aria-pressed'), 'true');
  await info.click();
  assert.equal(await info.getAttribute('aria-pressed'), 'false');
  await info.click();
  const bar = page.getByRole('progressbar', { name: 'progress' });
  assert.deepEqual([await bar.getAttribute('aria-valuenow'), await bar.getAttribute('aria-valuemax')], ['3', '3']);
  assert.equal(await page.locator('[data-role=announce]').textContent(), 'run completed');
  // A result opens with the keyboard; a log line shows its details with Enter.
  const twisty = page.locator('.results .twisty').first();
  await twisty.focus();
  await page.keyboard.press('Enter');
  await waitFor('expanded', async () => (await page.locator('.results .twisty').first().getAttribute('aria-expanded')) === 'true');
  await page.locator('.viewport .line').first().focus();
  await page.keyboard.press('Enter');
  assert.ok(await page.locator('[data-role=detail]').isVisible());
  await page.close();
});
