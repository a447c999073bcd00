// Browser tests of the client in clients/js, in Debian's headless Chromium driven by
// playwright-core: through the demo page (src/serve/demo/, which runs on the client's
// bundle) and a small React app on its hook. Run by tests/browser.rs (js_client_in_chromium),
// which starts `notifyd worker` and two `notifyd serve --demo` processes on a fresh
// database and passes:
//
//   NOTIFYD_URL          serve with metrics (killed and restarted over the control channel)
//   NOTIFYD_METRICS_URL  its /metrics listener (notifyd_streams_open: streams it holds)
//   NOTIFYD_SHORT_URL    serve with 8 s demo tokens and no leeway (the renewal scenario)
//   DATABASE_URL         the test database (events are enqueued with plain SQL)
//   NOTIFYD_DEMO_USER    the demo user (default 42)
//   NOTIFYD_CLIENT_DIR   clients/js (built: dist/), to bundle the React app
//   CHROMIUM             the browser binary
//
// Control channel: `CONTROL kill-serve` / `CONTROL start-serve` on stdout, answered by
// `ok <command>` on stdin. Exit code 0 when every scenario passed; figures are printed
// with a `FIGURES` prefix. Every wait is for an explicit condition, with a bound.

import { createInterface } from 'node:readline';
import { execFileSync } from 'node:child_process';
import { readFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) fail(`${name} is not set (tests/browser.rs sets it)`);
  return v.replace(/\/+$/, '');
};
const BASE = env('NOTIFYD_URL');
const METRICS = env('NOTIFYD_METRICS_URL');
const SHORT = env('NOTIFYD_SHORT_URL');
const DATABASE_URL = env('DATABASE_URL');
const CLIENT_DIR = env('NOTIFYD_CLIENT_DIR');
const USER = process.env.NOTIFYD_DEMO_USER || '42';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TABS = 6;
const TAKEOVER_LIMIT_MS = 5000;

function log(...args) {
  console.log('[client]', ...args);
}
function fail(msg) {
  console.error(`[client] FAIL: ${msg}`);
  process.exit(1);
}
class AssertionError extends Error {}
function check(cond, msg) {
  if (!cond) throw new AssertionError(msg);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `fn` until it returns a truthy value; fail with `what()` after `limitMs`. */
async function until(fn, limitMs, what) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() >= deadline) throw new AssertionError(`${typeof what === 'function' ? await what() : what} (after ${limitMs} ms)`);
    await sleep(50);
  }
}

// ---- the control channel -----------------------------------------------------------

const stdinLines = [];
const stdinWaiters = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const w = stdinWaiters.shift();
  if (w) w(line.trim());
  else stdinLines.push(line.trim());
});
async function control(cmd) {
  console.log(`CONTROL ${cmd}`);
  const line = await new Promise((resolve, reject) => {
    if (stdinLines.length) return resolve(stdinLines.shift());
    const t = setTimeout(() => reject(new Error(`no answer to CONTROL ${cmd}`)), 60000);
    stdinWaiters.push((l) => {
      clearTimeout(t);
      resolve(l);
    });
  });
  check(line === `ok ${cmd}`, `CONTROL ${cmd} answered ${JSON.stringify(line)}`);
}

// ---- database and server -----------------------------------------------------------

const db = new pg.Client({ connectionString: DATABASE_URL });

async function enqueue(body) {
  const r = await db.query(
    "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2) RETURNING id",
    [USER, body],
  );
  return Number(r.rows[0].id);
}

/** Wait until every event is stored as a notification. */
async function stored(eventIds) {
  await until(
    async () => {
      const r = await db.query(
        "SELECT count(*)::int AS n FROM notify.event_outcomes WHERE event_id = ANY($1::int8[]) AND outcome = 'stored'",
        [eventIds],
      );
      return r.rows[0].n === eventIds.length;
    },
    30000,
    `events ${eventIds} not all stored`,
  );
}

async function enqueueAll(prefix, n) {
  const ids = [];
  for (let i = 0; i < n; i++) ids.push(await enqueue(`${prefix} ${i}`));
  await stored(ids);
}

async function dbIds() {
  const r = await db.query('SELECT id FROM notify.notifications WHERE user_id = $1 ORDER BY id', [USER]);
  return r.rows.map((x) => String(x.id));
}

async function dbUnread() {
  const r = await db.query('SELECT count(*)::int AS n FROM notify.notifications WHERE user_id = $1 AND read_at IS NULL', [USER]);
  return String(r.rows[0].n);
}

/** How many streams the metrics serve process holds (the test has one user). */
async function streamsOpen() {
  const text = await (await fetch(`${METRICS}/metrics`)).text();
  const m = /^notifyd_streams_open(?:\{[^}]*\})? (\S+)$/m.exec(text);
  return m ? Number(m[1]) : 0;
}

/** Wait until the server holds exactly `n` streams, then check it stays so for `holdMs`. */
async function exactlyStreams(n, holdMs = 2000) {
  await until(async () => (await streamsOpen()) === n, 15000, async () => `the server holds ${await streamsOpen()} streams, not ${n}`);
  const end = Date.now() + holdMs;
  while (Date.now() < end) {
    const s = await streamsOpen();
    check(s === n, `the server holds ${s} streams, not ${n}`);
    await sleep(100);
  }
}

// ---- pages -------------------------------------------------------------------------

// The demo page: #list > li[data-id] newest first, #status, #unread, #role.
const demoIds = (page) => page.$$eval('#list > li', (lis) => lis.map((li) => li.dataset.id));
const text = async (page, sel) => ((await page.textContent(sel)) || '').trim();

function dups(list) {
  const seen = new Set();
  return list.filter((x) => (seen.has(x) ? true : (seen.add(x), false)));
}

/**
 * Wait until the page's list is exactly `want` (ids, ascending), failing at once on a
 * duplicate, an id the user does not have, or a wrong order. `order`: 'desc' for the
 * demo page, 'asc' for the React app.
 */
async function waitList(page, want, { read = demoIds, order = 'desc', limitMs = 15000, name = 'page' } = {}) {
  const all = new Set(await dbIds());
  let shown = [];
  await until(
    async () => {
      shown = await read(page);
      check(new Set(shown).size === shown.length, `${name}: duplicates ${dups(shown)}`);
      const extra = shown.filter((id) => !all.has(id) && !want.includes(id));
      check(extra.length === 0, `${name}: ids the user does not have: ${extra}`);
      const nums = shown.map(Number);
      const sorted = nums.every((v, i) => i === 0 || (order === 'desc' ? nums[i - 1] > v : nums[i - 1] < v));
      check(sorted, `${name}: the list is not ${order === 'desc' ? 'newest' : 'oldest'} first: ${shown}`);
      const asc = order === 'desc' ? [...shown].reverse() : shown;
      return asc.join() === want.join();
    },
    limitMs,
    () => {
      const asc = order === 'desc' ? [...shown].reverse() : shown;
      const missing = want.filter((id) => !asc.includes(id));
      const more = asc.filter((id) => !want.includes(id));
      return `${name} shows ${shown.length} of ${want.length}; missing ${missing}; not expected ${more}`;
    },
  );
}

async function waitStatus(page, wanted, limitMs = 15000, sel = '#status') {
  const list = Array.isArray(wanted) ? wanted : [wanted];
  await until(async () => list.includes(await text(page, sel)), limitMs, async () => `status is ${await text(page, sel)}, not ${list}`);
}

/** What a page that opened with the newest page shows later: from its oldest id on. */
async function fromOldestOf(page) {
  const low = Math.min(...(await demoIds(page)).map(Number));
  return (await dbIds()).filter((id) => Number(id) >= low);
}

const roles = (pages) => Promise.all(pages.map((p) => text(p, '#role')));

async function leaderOf(pages) {
  const r = await until(
    async () => {
      const rs = await roles(pages);
      return rs.filter((x) => x === 'leader').length === 1 ? rs : null;
    },
    TAKEOVER_LIMIT_MS,
    async () => `not exactly one leader among the tabs: ${await roles(pages)}`,
  );
  return pages[r.indexOf('leader')];
}

/** Every page shows `want` exactly, and the database's unread count. */
async function allShow(pages, want, limitMs = 15000) {
  const unread = await dbUnread();
  for (let i = 0; i < pages.length; i++) {
    await waitList(pages[i], want, { limitMs, name: `tab ${i + 1}` });
    await until(async () => (await text(pages[i], '#unread')) === unread, 5000, async () => `tab ${i + 1}: unread ${await text(pages[i], '#unread')}, the database has ${unread}`);
  }
}

function watchErrors(page, failures, name) {
  page.on('pageerror', (e) => failures.push(`${name}: uncaught page error: ${e.message}`));
}

// ---- scenarios ---------------------------------------------------------------------

const state = { context: null, tabs: [], failures: [] };

// Six tabs of one origin, opened at different times (notifications arrive in between):
// one stream on the server, every tab the same list, each notification exactly once.
async function scenarioSixTabs() {
  await enqueueAll('before any tab', 3);
  for (let i = 0; i < TABS; i++) {
    const page = await state.context.newPage();
    watchErrors(page, state.failures, `tab ${i + 1}`);
    await page.goto(`${BASE}/demo/`);
    await waitStatus(page, 'live');
    state.tabs.push(page);
    await enqueueAll(`after tab ${i + 1}`, 2);
  }
  await leaderOf(state.tabs);
  await allShow(state.tabs, await dbIds());
  await exactlyStreams(1);
  await enqueueAll('six tabs live', 10);
  const want = await dbIds();
  await allShow(state.tabs, want, 10000);
  await exactlyStreams(1, 1000);
  console.log(`FIGURES six tabs: 1 stream on the server; each of ${TABS} tabs shows all ${want.length} notifications exactly once`);
}

// Close the leader: another tab takes over within seconds and resumes; nothing lost.
async function scenarioLeaderCloses() {
  const leader = await leaderOf(state.tabs);
  state.tabs = state.tabs.filter((p) => p !== leader);
  const closedAt = Date.now();
  const during = enqueueAll('while the leader closes', 5);
  await leader.close();
  const next = await leaderOf(state.tabs);
  const takeover = Date.now() - closedAt;
  await waitStatus(next, 'live', TAKEOVER_LIMIT_MS);
  const live = Date.now() - closedAt;
  await during;
  await enqueueAll('after the hand-over', 5);
  await allShow(state.tabs, await dbIds());
  await exactlyStreams(1);
  console.log(`FIGURES leader hand-over: a new leader after ${takeover} ms, its stream live after ${live} ms; nothing lost or repeated in ${state.tabs.length} tabs`);
}

// SIGKILL serve and restart it: every tab ends with each notification exactly once.
async function scenarioServeKilled() {
  await enqueueAll('before the kill', 2);
  await control('kill-serve');
  await enqueueAll('while serve is down', 5);
  await waitStatus(state.tabs[0], ['reconnecting', 'polling', 'error'], 10000);
  await control('start-serve');
  await enqueueAll('after the restart', 5);
  await allShow(state.tabs, await dbIds(), 30000);
  for (const p of state.tabs) await waitStatus(p, 'live', 30000);
  await exactlyStreams(1);
  await sleep(1000); // would a late replay repeat something?
  await allShow(state.tabs, await dbIds(), 1000);
  console.log(`FIGURES serve SIGKILL: ${(await dbIds()).length} notifications, each once in every tab; 1 stream after the restart`);
}

const APP_HTML = '<!doctype html><meta charset="utf-8"><title>react</title><div id="root"></div><script src="/react-test/app.js"></script>';
let appJs = null;

async function openReactApp(context) {
  await context.route(`${BASE}/react-test/**`, (route) => {
    const url = new URL(route.request().url());
    if (url.pathname === '/react-test/app.js') return route.fulfill({ contentType: 'text/javascript', body: appJs });
    return route.fulfill({ contentType: 'text/html', body: APP_HTML });
  });
  const page = await context.newPage();
  watchErrors(page, state.failures, 'react app');
  await page.goto(`${BASE}/react-test/`);
  return page;
}
const reactIds = (page) => page.$$eval('#items > li', (lis) => lis.map((li) => li.dataset.id));

// The React app on the hook: as one more tab (a follower: it shows what the other tabs
// hold, and opens no stream), then alone in its own browser context (the leader, with
// the newest page and loadMore through older history).
async function scenarioReact() {
  const dir = mkdtempSync(join(tmpdir(), 'notifyd-react-'));
  execFileSync('node', [join(CLIENT_DIR, 'scripts', 'bundle.mjs'), 'test-app', join(dir, 'app.js')], { stdio: 'inherit' });
  appJs = readFileSync(join(dir, 'app.js'), 'utf8');

  const page = await openReactApp(state.context);
  await waitStatus(page, 'live', 15000, '#conn');
  check((await text(page, '#role')) === 'follower', 'the React tab took the lead from the demo tabs');
  await waitList(page, await dbIds(), { read: reactIds, order: 'asc', name: 'react tab' });
  await enqueueAll('react follower', 3);
  await waitList(page, await dbIds(), { read: reactIds, order: 'asc', name: 'react tab' });
  await until(async () => (await text(page, '#unread')) === (await dbUnread()), 5000, 'react tab: unread is not the database count');
  await exactlyStreams(1, 500);

  // Alone: the newest page (50), then older history by loadMore until there is no more.
  await enqueueAll('more history', 30);
  const own = await state.context.browser().newContext();
  const solo = await openReactApp(own);
  await waitStatus(solo, 'live', 15000, '#conn');
  check((await text(solo, '#role')) === 'leader', 'the React app alone is not its own leader');
  const all = await dbIds();
  check(all.length > 50, `the test needs more than one page of history (${all.length})`);
  await waitList(solo, all.slice(-50), { read: reactIds, order: 'asc', name: 'react alone' });
  let pages = 0;
  while (await solo.isEnabled('#more')) {
    const before = (await reactIds(solo)).length;
    await solo.click('#more');
    await until(async () => (await reactIds(solo)).length > before || !(await solo.isEnabled('#more')), 5000, 'loadMore added nothing');
    pages++;
    check(pages < 10, 'loadMore never ends');
  }
  await waitList(solo, all, { read: reactIds, order: 'asc', name: 'react alone after loadMore' });
  check((await text(solo, '#unread')) === (await dbUnread()), 'react alone: unread is not the database count');
  await own.close();
  await page.close();
  console.log(`FIGURES react: the hook renders ${all.length} notifications, unread count and state (follower tab and alone; ${pages} loadMore pages)`);
}

// Streaming blocked (a proxy answers 404): the client long-polls and still delivers.
// Without Web Locks: each tab streams on its own, and still shows each notification once.
async function scenarioFallbacks() {
  const blocked = await state.context.browser().newContext();
  await blocked.route('**/api/notifications/stream*', (route) => route.fulfill({ status: 404, body: '' }));
  const p = await blocked.newPage();
  watchErrors(p, state.failures, 'no-stream tab');
  await p.goto(`${BASE}/demo/`);
  await waitStatus(p, 'polling', 15000);
  await waitList(p, (await dbIds()).slice(-50), { name: 'no-stream tab' });
  await enqueueAll('while polling', 3);
  await waitList(p, await fromOldestOf(p), { name: 'no-stream tab' });
  await blocked.close();

  const nolocks = await state.context.browser().newContext();
  await nolocks.addInitScript(() => {
    Object.defineProperty(Navigator.prototype, 'locks', { get: () => undefined });
  });
  const before = await streamsOpen();
  const a = await nolocks.newPage();
  const b = await nolocks.newPage();
  for (const [pg, name] of [[a, 'no-locks tab 1'], [b, 'no-locks tab 2']]) {
    watchErrors(pg, state.failures, name);
    await pg.goto(`${BASE}/demo/`);
    await waitStatus(pg, 'live');
    check((await text(pg, '#role')) === 'leader', `${name} is not its own leader`);
  }
  await exactlyStreams(before + 2, 500);
  await waitList(a, (await dbIds()).slice(-50), { name: 'no-locks tab 1' });
  await enqueueAll('no locks', 3);
  const want = await fromOldestOf(a);
  await waitList(a, want, { name: 'no-locks tab 1' });
  await waitList(b, want, { name: 'no-locks tab 2' });
  await nolocks.close();
  await exactlyStreams(before);
  console.log('FIGURES fallbacks: streaming refused -> polling, delivered; no Web Locks -> a stream per tab, each notification once');
}

// Tokens of 8 s (no leeway: the server ends a stream at `exp`): notifications every
// 250 ms for 20 s arrive exactly once and without a gap across the renewals.
async function scenarioTokenRenewal() {
  const ctx = await state.context.browser().newContext();
  const requests = { token: 0, stream: 0 };
  ctx.on('request', (r) => {
    const u = new URL(r.url());
    if (u.pathname === '/demo/token') requests.token++;
    if (u.pathname === '/api/notifications/stream') requests.stream++;
  });
  const statuses = [];
  ctx.on('response', (r) => {
    if (new URL(r.url()).pathname.startsWith('/api/')) statuses.push(r.status());
  });
  const page = await ctx.newPage();
  watchErrors(page, state.failures, 'short-token tab');
  await page.addInitScript(() => {
    window.__seen = {};
    document.addEventListener('DOMContentLoaded', () => {
      new MutationObserver(() => {
        for (const b of document.querySelectorAll('#list .body')) {
          if (!(b.textContent in window.__seen)) window.__seen[b.textContent] = Date.now();
        }
      }).observe(document.getElementById('list'), { childList: true, subtree: true });
    });
  });
  await page.goto(`${SHORT}/demo/`);
  await waitStatus(page, 'live');
  const start = await demoIds(page);
  const sent = [];
  const t0 = Date.now();
  for (let i = 0; Date.now() - t0 < 20000; i++) {
    const body = `renewal probe ${i}`;
    sent.push({ body, at: Date.now(), id: await enqueue(body) });
    await sleep(250);
  }
  await stored(sent.map((s) => s.id));
  const r = await db.query('SELECT id FROM notify.notifications WHERE user_id = $1 AND body = ANY($2) ORDER BY id', [USER, sent.map((s) => s.body)]);
  const want = [...start.map(Number), ...r.rows.map((x) => Number(x.id))].sort((a, b) => a - b).map(String);
  await waitList(page, want, { name: 'short-token tab', limitMs: 10000 });
  const seen = await page.evaluate(() => window.__seen);
  const lat = sent.map((s) => seen[s.body] - s.at).sort((a, b) => a - b);
  const worst = lat[lat.length - 1];
  check(requests.token >= 3, `only ${requests.token} token requests in 20 s of 8 s tokens: no renewal`);
  check(requests.stream >= 3, `only ${requests.stream} stream requests: the stream was not renewed`);
  check(!statuses.includes(401), `a request got 401 (the token was not renewed ahead of expiry): ${statuses.filter((s) => s >= 400)}`);
  check(worst < 2000, `a notification took ${worst} ms to show: a gap at a renewal`);
  await ctx.close();
  console.log(
    `FIGURES token renewal: ${sent.length} notifications over 20 s with 8 s tokens, each once; ${requests.token} tokens, ` +
      `${requests.stream} streams; INSERT -> shown median ${lat[Math.floor(lat.length / 2)]} ms, max ${worst} ms`,
  );
}

const SCENARIOS = [
  ['six tabs, one stream', scenarioSixTabs],
  ['the leader tab closes', scenarioLeaderCloses],
  ['serve SIGKILLed and restarted', scenarioServeKilled],
  ['the React hook', scenarioReact],
  ['fallbacks', scenarioFallbacks],
  ['token renewal', scenarioTokenRenewal],
];

async function main() {
  await db.connect();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
  try {
    state.context = await browser.newContext();
    for (const [name, run] of SCENARIOS) {
      const t = Date.now();
      log(`--- ${name}`);
      await run();
      check(state.failures.length === 0, state.failures.join('; '));
      log(`ok: ${name} (${Date.now() - t} ms)`);
    }
  } finally {
    await browser.close().catch(() => {});
    await db.end().catch(() => {});
  }
  console.log(`client scenarios: ${SCENARIOS.length} passed, 0 failed`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`[client] FAIL: ${e instanceof AssertionError ? e.message : e.stack || e}`);
    process.exit(1);
  },
);
