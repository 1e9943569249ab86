// A command experiment in the UI: `athanor up --config examples/athanor.toml` hosts the
// example Python training script; its form is built from the declared fields, and its
// run is followed live to the end (progress bar lines, logging levels, results). Three
// of its runs at different learning rates, compared (and the screenshots of that page).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { up, browser, startRun, runStatus, waitFor, EXAMPLES, SCREENSHOTS } from './harness.mjs';

let athanor;
let chromium;
before(async () => {
  athanor = await up({}, join(EXAMPLES, 'athanor.toml'));
  chromium = await browser();
});
after(async () => { await chromium?.close(); await athanor?.stop(); });

test('the example training script has a form built from its declaration and a live run page', async () => {
  const page = await chromium.newPage({ viewport: { width: 1280, height: 2000 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`${athanor.url}/#/experiments`);
  const form = page.locator('form[data-experiment=train]');
  await form.waitFor();
  assert.ok((await page.locator('body').textContent()).includes('Trains the toy model'));
  // One control per declared field, with its default.
  assert.equal(await form.locator('input[name=epochs]').inputValue(), '3');
  assert.equal(await form.locator('input[name=lr]').inputValue(), '0.001');
  assert.equal(await form.locator('input[name=note]').inputValue(), '');
  assert.deepEqual(await form.locator('select[name=optimizer] option').allTextContents(), ['adam', 'sgd']);
  assert.equal(await form.locator('input[name=shuffle]').isChecked(), true);
  // The worker's bounds, through the API's message.
  await form.locator('input[name=epochs]').fill('0');
  await form.getByRole('button', { name: 'Start run' }).click();
  const error = form.locator('[data-error-for=epochs]');
  await waitFor('the field error', async () => (await error.textContent()) !== '');
  assert.equal(await error.textContent(), 'must be at least 1, got 0');

  await form.locator('input[name=epochs]').fill('2');
  await form.locator('input[name=note]').fill('<b>from the browser</b> $(touch /tmp/x)');
  await form.getByRole('button', { name: 'Start run' }).click();
  await waitFor('the run page', async () => page.url().includes('#/runs/'));
  // Live: the page says running while the script trains.
  await waitFor('running', async () => (await page.locator('.run-head .badge').textContent()) === 'running');
  await waitFor('the run to end', async () => (await page.locator('[data-role=conn]').textContent()) === 'ended', 90_000);
  assert.equal(await page.locator('.run-head .badge').textContent(), 'completed');
  // Rows are drawn on the next animation frame: wait for the script's last line.
  const messages = await waitFor('the last line drawn', async () => {
    const shown = await page.locator('.viewport .line .msg').allTextContents();
    return shown.some((m) => m.startsWith('done: y = ')) && shown;
  });
  assert.ok(messages.includes('note: <b>from the browser</b> $(touch /tmp/x)'), messages.join('\n'));
  assert.ok(messages.includes('training for 2 epochs with adam (lr 0.001)'), messages.join('\n'));
  assert.ok(messages.some((m) => /^epoch 2\/2: loss /.test(m)), messages.join('\n'));
  // The progress bar's final state, and far fewer bar lines than redraws (400).
  const bars = messages.filter((m) => /^\s*\d+%\|/.test(m));
  assert.ok(bars.some((m) => m.startsWith('100%|') && m.includes('200/200')), bars.join('\n'));
  assert.ok(bars.length < 100, `${bars.length} bar lines`);
  // Python's logging kept its levels: INFO lines, not stderr's WARN.
  const levels = await page.locator('.viewport .line').evaluateAll((rows) => rows.map((r) => r.children[2].textContent));
  const trainingLine = messages.indexOf('training for 2 epochs with adam (lr 0.001)');
  assert.equal(levels[trainingLine], 'INFO');
  const results = await page.locator('[data-role=results]').textContent();
  assert.ok(results.includes('converged'), results);
  assert.ok(results.includes('weights'), results);
  assert.equal(await page.locator('main b').count(), 0);
  assert.deepEqual(problems, []);
  await page.close();
});

test('three training runs at different learning rates, compared', { timeout: 180_000 }, async () => {
  const rates = [0.001, 0.003, 0.01];
  const ids = [];
  for (const lr of rates) ids.push(await startRun(athanor.url, 'train', { epochs: 2, lr }));
  for (const id of ids) await waitFor(`${id} completed`, async () => (await runStatus(athanor.url, id)).status === 'completed', 120_000);
  mkdirSync(SCREENSHOTS, { recursive: true });
  for (const colorScheme of ['light', 'dark']) {
    const page = await chromium.newPage({ viewport: { width: 1280, height: 900 }, colorScheme });
    const problems = [];
    page.on('pageerror', (e) => problems.push(e.message));
    await page.goto(`${athanor.url}/compare?runs=${ids.join(',')}`);
    // One overlaid chart per metric the runs share, each naming the three runs.
    await waitFor('the charts drawn', async () => (await page.locator('figure.chart[data-last-x]').count()) === 4);
    assert.deepEqual((await page.locator('figure.chart').evaluateAll((els) => els.map((e) => e.dataset.metric))).sort(),
      ['accuracy', 'epoch_loss', 'loss', 'lr']);
    const legend = await page.locator('figure.chart[data-metric=loss] .chart-legend-row').allTextContents();
    assert.deepEqual(legend.map((row) => ids.find((id) => row.includes(id))), ids);
    // The learning rate is the config that differs, highlighted; results side by side.
    const differs = await page.locator('[data-role=config] tr.differs').evaluateAll((rows) => rows.map((r) => r.dataset.field));
    assert.deepEqual(differs, ['lr']);
    assert.deepEqual(await page.locator('[data-role=config] tr[data-field=lr] td').allTextContents(), rates.map(String));
    assert.equal(await page.locator('[data-role=results] tr[data-field=loss] td').count(), 3);
    const path = join(SCREENSHOTS, `compare-${colorScheme}.png`);
    await page.screenshot({ path, fullPage: true });
    console.log(`saved ${path}`);
    assert.deepEqual(problems, []);
    await page.close();
  }
});
