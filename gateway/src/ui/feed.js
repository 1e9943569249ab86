// A run's live feed read with fetch() rather than EventSource, so that the page knows
// what EventSource hides: the keep-alive comments (silence for twice the interval the
// server announces means the connection is gone, even when the socket says nothing),
// and the gateway's time on every event (how far behind the page is). It sends the
// API token as a header (no feed token needed), resumes with Last-Event-ID, and when
// the page has fallen too far behind it starts again from a fresh snapshot.

'use strict';

/** Lag (s) from which the page says it is behind. */
export const SHOW_BEHIND = 2;
/** Lag (s) from which it skips ahead to a fresh snapshot. */
export const SKIP_AHEAD = 3;

/**
 * Parses `text/event-stream` text: `push(chunk)` returns the complete events
 * (`{event, id, data}`) it finished; comments only count as activity.
 */
export class SseParser {
  constructor() {
    this.buffer = '';
    this.searched = 0;   // the buffer before this holds no blank line
  }
  push(chunk) {
    // Linear in the bytes received: each byte is searched once, the buffer is cut
    // once per chunk (a chunk may hold hundreds of events, an event many chunks).
    const buffer = this.buffer + chunk;
    const blank = /\r\n\r\n|\n\n|\r\r/g;
    const events = [];
    let start = 0;
    blank.lastIndex = Math.max(0, this.searched - 3);
    for (let found; (found = blank.exec(buffer));) {
      const event = parseBlock(buffer.slice(start, found.index));
      if (event) events.push(event);
      start = found.index + found[0].length;
    }
    this.buffer = buffer.slice(start);
    this.searched = this.buffer.length;
    return events;
  }
}

/** One event's lines → `{event, id, data}`; `null` for a comment alone. */
function parseBlock(block) {
  let event = 'message';
  let id = null;
  const data = [];
  let fields = 0;
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    fields += 1;
    if (name === 'event') event = value;
    else if (name === 'id') id = value;
    else if (name === 'data') data.push(value);
  }
  return fields ? { event, id, data: data.join('\n') } : null;
}

/**
 * Follows `path` until `close()` or a `status` event. `handlers[event]` get each
 * event's parsed data; `onState(text, cls)` is told `live`, `behind N s`,
 * `reconnecting…`, `resyncing…`, or an error.
 */
export class Feed {
  constructor(path, { handlers, onState, headers, measureLag = true }) {
    this.path = path;
    // Only where `at` is the gateway's clock (a run's feed); a lifecycle change's `at`
    // is its worker's, which may be set apart from any other's.
    this.measureLag = measureLag;
    this.handlers = handlers;
    this.onState = onState;
    this.headers = headers;
    this.lastId = null;
    this.closed = false;
    this.ended = false;      // the run's status arrived
    this.controller = null;
    this.lastByte = Date.now();
    this.keepAliveMs = 15000;
    this.clockBase = null;   // the smallest (local − gateway) time seen on this connection
    this.behind = 0;         // seconds
    this.failures = 0;
    this.watchdog = setInterval(() => this.check(), 500);
    this.connect();
  }

  close() {
    this.closed = true;
    clearInterval(this.watchdog);
    this.controller?.abort();
  }

  /** Drops the connection and opens a new one: from `lastId`, or fresh when `fresh`. */
  restart(state, fresh) {
    this.controller?.abort();
    if (fresh) this.lastId = null;
    this.onState(state, 'reconnecting');
    this.connect();
  }

  check() {
    if (this.closed || !this.controller) return;
    const silence = Date.now() - this.lastByte;
    if (this.keepAliveMs > 0 && silence > 2 * this.keepAliveMs) {
      this.restart('reconnecting…', false);
    }
  }

  async connect() {
    const controller = new AbortController();
    this.controller = controller;
    this.clockBase = null;
    this.lastByte = Date.now();
    const headers = { accept: 'text/event-stream', ...this.headers() };
    if (this.lastId !== null) headers['last-event-id'] = this.lastId;
    let response;
    try {
      response = await fetch(this.path, { headers, signal: controller.signal, cache: 'no-store' });
    } catch {
      return this.retry(controller);
    }
    if (controller !== this.controller) return;
    if (!response.ok) {
      let message = `the gateway answered ${response.status}`;
      try { message = (await response.json()).error || message; } catch { /* not JSON */ }
      if (response.status >= 500) return this.retry(controller);
      this.controller = null;
      this.onState(message, 'error', response.status);
      return;
    }
    const announced = Number(response.headers.get('athanor-keep-alive-ms'));
    if (Number.isFinite(announced) && response.headers.has('athanor-keep-alive-ms')) this.keepAliveMs = announced;
    this.failures = 0;
    this.onState('live', 'live');
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || controller !== this.controller) break;
        this.lastByte = Date.now();
        // Events one after another, yielding to the page between them once a slice of
        // work has run 8 ms (EventSource gave each event a task of its own).
        let slice = performance.now();
        for (const event of parser.push(value)) {
          if (controller !== this.controller) break;
          await this.dispatch(event);
          if (performance.now() - slice > 8) {
            await new Promise((resume) => { setTimeout(resume, 0); });
            slice = performance.now();
          }
        }
      }
    } catch { /* aborted or dropped */ }
    if (controller === this.controller && !this.closed && !this.ended) this.retry(controller);
  }

  retry(controller) {
    if (this.closed || controller !== this.controller) return;
    this.failures += 1;
    this.onState('reconnecting…', 'reconnecting');
    const wait = Math.min(10000, 500 * 2 ** Math.min(this.failures, 5));
    setTimeout(() => { if (!this.closed && controller === this.controller) this.connect(); }, wait);
  }

  async dispatch(event) {
    if (event.id !== null && event.id !== '') this.lastId = event.id;
    if (event.event === 'resync') {
      // A run's feed: a fresh snapshot follows. A list (the lifecycle feed) reloads.
      if (this.handlers.resync) this.handlers.resync();
      else this.onState('resyncing…', 'reconnecting');
      return;
    }
    let data = null;
    const parsing = performance.now();
    try { data = JSON.parse(event.data); } catch { return; }
    // A large event (a snapshot of many series) is parsed in one task and applied in
    // the next, so neither holds the page for long.
    if (performance.now() - parsing > 8) await new Promise((resume) => { setTimeout(resume, 0); });
    const handler = this.handlers[event.event];
    if (event.event === 'status') {
      this.ended = true;
      handler?.(data);
      this.close();
      return;
    }
    handler?.(data);
    if (this.measureLag && typeof data?.at === 'number' && data.at > 0) this.lag(data.at);
  }

  /** How far behind the gateway this page is, from the gateway's time on an event. */
  lag(at) {
    const delta = Date.now() - at / 1000;
    if (this.clockBase === null || delta < this.clockBase) this.clockBase = delta;
    this.behind = Math.max(0, (delta - this.clockBase) / 1000);
    if (this.behind > SKIP_AHEAD) {
      this.restart('resyncing…', true);
    } else if (this.behind > SHOW_BEHIND) {
      this.onState(`behind ${this.behind.toFixed(1)} s`, 'behind');
    } else {
      this.onState('live', 'live');
    }
  }
}
