// Browser tests of the demo inbox (src/serve/demo/), in Debian's headless Chromium driven by
// playwright-core. Run by tests/browser.rs, which starts `notifyd worker` and
// `notifyd serve --demo` against a fresh database and passes:
//
//   NOTIFYD_URL         base URL of `notifyd serve --demo` (http://127.0.0.1:<port>)
//   DATABASE_URL        the test database (events are enqueued with plain SQL, as a backend does)
//   NOTIFYD_DEMO_USER   the demo user (default 42)
//   CHROMIUM            the browser binary (default /usr/bin/chromium)
//
// Control channel with the Rust side (to kill and restart the serve process): this script
// prints `CONTROL kill-serve` or `CONTROL start-serve` on stdout and waits for the line
// `ok kill-serve` / `ok start-serve` on stdin.
//
// Exit code 0 when every scenario passed; figures are printed with a `FIGURES` prefix.

import { createInterface } from 'node:readline';
import { existsSync } from 'node:fs';
import pg from 'pg';
import { chromium } from 'playwright-core';

const BASE = requireEnv('NOTIFYD_URL').replace(/\/+$/, '');
const DATABASE_URL = requireEnv('DATABASE_URL');
const USER = process.env.NOTIFYD_DEMO_USER || '42';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const APPEAR_LIMIT_MS = 1000;

function requireEnv(name) {
  const v = process.env[name];
  if (!v) fail(`${name} is not set (tests/browser.rs sets it)`);
  return v;
}

function log(...args) {
  console.log('[browser]', ...args);
}

function fail(msg) {
  console.error(`[browser] FAIL: ${msg}`);
  process.exit(1);
}

class AssertionError extends Error {}
function check(cond, msg) {
  if (!cond) throw new AssertionError(msg);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- the control channel -----------------------------------------------------------

const stdinLines = [];
const stdinWaiters = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const w = stdinWaiters.shift();
  if (w) w(line.trim());
  else stdinLines.push(line.trim());
});

async function control(cmd, timeoutMs = 60000) {
  console.log(`CONTROL ${cmd}`);
  const line = await new Promise((resolve, reject) => {
    if (stdinLines.length) return resolve(stdinLines.shift());
    const t = setTimeout(() => reject(new Error(`no answer to CONTROL ${cmd}`)), timeoutMs);
    stdinWaiters.push((l) => {
      clearTimeout(t);
      resolve(l);
    });
  });
  check(line === `ok ${cmd}`, `CONTROL ${cmd} answered ${JSON.stringify(line)}`);
}

// ---- database ----------------------------------------------------------------------

const db = new pg.Client({ connectionString: DATABASE_URL });

async function enqueue(body, link = null, eventType = 'new_message') {
  const r = await db.query(
    'INSERT INTO notify.events (user_id, event_type, body, link) VALUES ($1, $2, $3, $4) RETURNING id',
    [USER, eventType, body, link],
  );
  return Number(r.rows[0].id);
}

// Wait until every given event has an outcome; returns {eventId: {outcome, notificationId, body, link}}.
async function processed(eventIds, limitMs = 30000) {
  return outcomes(eventIds, limitMs);
}

// Wait until every given event is stored as a notification.
async function stored(eventIds, limitMs = 30000) {
  const out = await outcomes(eventIds, limitMs);
  for (const [id, o] of Object.entries(out)) {
    check(o.outcome === 'stored', `event ${id} was not stored: ${o.outcome} (${o.reason})`);
  }
  return out;
}

async function outcomes(eventIds, limitMs) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const r = await db.query(
      `SELECT o.event_id, o.outcome, o.outcome_reason, n.id AS nid, n.body, n.link
         FROM notify.event_outcomes o LEFT JOIN notify.notifications n ON n.id = o.notification_id
        WHERE o.event_id = ANY($1::int8[])`,
      [eventIds],
    );
    if (r.rows.length === eventIds.length && r.rows.every((x) => x.outcome !== null)) {
      const out = {};
      for (const x of r.rows) {
        out[x.event_id] = {
          outcome: x.outcome,
          reason: x.outcome_reason,
          id: x.nid === null ? null : Number(x.nid),
          body: x.body,
          link: x.link,
        };
      }
      return out;
    }
    check(Date.now() < deadline, `events ${eventIds} not processed within ${limitMs} ms`);
    await sleep(20);
  }
}

async function dbIds() {
  const r = await db.query('SELECT id FROM notify.notifications WHERE user_id = $1 ORDER BY id', [USER]);
  return r.rows.map((x) => Number(x.id));
}

// ---- page helpers ------------------------------------------------------------------

async function pageIds(page) {
  return page.$$eval('#list > li', (lis) => lis.map((li) => li.dataset.id));
}

async function status(page) {
  return (await page.textContent('#status')).trim();
}

async function waitStatus(page, wanted, timeoutMs) {
  const list = Array.isArray(wanted) ? wanted : [wanted];
  await page.waitForFunction(
    (w) => w.includes(document.getElementById('status').textContent.trim()),
    list,
    { timeout: timeoutMs, polling: 50 },
  );
}

// Wait until the page shows exactly `ids` (as a set), failing on any duplicate on the way.
async function waitShown(page, ids, timeoutMs) {
  const want = new Set(ids.map(String));
  const deadline = Date.now() + timeoutMs;
  let shown = [];
  for (;;) {
    shown = await pageIds(page);
    const uniq = new Set(shown);
    check(uniq.size === shown.length, `duplicate <li data-id>: ${dups(shown)}`);
    const extra = shown.filter((id) => !want.has(id));
    check(extra.length === 0, `the page shows ids the user does not have: ${extra}`);
    if (uniq.size === want.size) return shown;
    if (Date.now() >= deadline) {
      const missing = [...want].filter((id) => !uniq.has(id));
      throw new AssertionError(
        `after ${timeoutMs} ms the page shows ${uniq.size} of ${want.size}; missing ${missing}; status ${await status(page)}`,
      );
    }
    await sleep(25);
  }
}

function dups(list) {
  const seen = new Set();
  return list.filter((x) => (seen.has(x) ? true : (seen.add(x), false)));
}

// The DOM inside #list must be the page's own markup only: these tags, these attributes.
const OWN_TAGS = new Set(['LI', 'DIV', 'SPAN', 'TIME', 'P', 'A', 'UL']);
const OWN_ATTRS = new Set(['class', 'data-id', 'data-type', 'datetime', 'href', 'rel']);

async function assertOwnMarkupOnly(page) {
  const report = await page.evaluate(
    ({ tags, attrs }) => {
      const bad = [];
      const list = document.getElementById('list');
      for (const e of list.querySelectorAll('*')) {
        if (!tags.includes(e.tagName)) bad.push(`element <${e.tagName.toLowerCase()}>`);
        for (const a of e.attributes) {
          if (!attrs.includes(a.name)) bad.push(`attribute ${a.name} on <${e.tagName.toLowerCase()}>`);
        }
        if (e.tagName === 'A') {
          const u = new URL(e.href);
          const raw = e.getAttribute('href');
          const sameOrigin = raw.startsWith('/') && !raw.startsWith('//') && u.origin === location.origin;
          if (!sameOrigin && u.protocol !== 'http:' && u.protocol !== 'https:') bad.push(`href ${raw}`);
          if (e.rel !== 'noopener noreferrer') bad.push(`rel ${e.rel} on a link`);
        }
      }
      // Outside the list as well: nothing the payloads could have added.
      const scripts = [...document.scripts].map((s) => s.getAttribute('src'));
      if (scripts.length !== 1 || scripts[0] !== '/demo/inbox.js') bad.push(`scripts: ${scripts}`);
      for (const sel of ['iframe', 'object', 'embed', 'frame', 'svg', 'img', 'math', 'form', 'base', 'style']) {
        const n = document.querySelectorAll(sel).length;
        if (n) bad.push(`${n} <${sel}> in the document`);
      }
      return { bad, pwned: typeof window.__pwned, csp: window.__csp || [] };
    },
    { tags: [...OWN_TAGS], attrs: [...OWN_ATTRS] },
  );
  check(report.bad.length === 0, `foreign markup in the DOM: ${report.bad.join('; ')}`);
  check(report.pwned === 'undefined', 'window.__pwned was set: a payload ran');
  check(report.csp.length === 0, `CSP violations: ${JSON.stringify(report.csp)}`);
}

// ---- the XSS corpus ----------------------------------------------------------------

// Every vector tries to set window.__pwned (or open a dialog) if it ever runs as markup.
// Each is enqueued as a body `XSS-<n> <vector> end`, so some text survives the sanitizer.
const VECTORS = [
  '<script>window.__pwned=1</script>',
  '<img src=x onerror="window.__pwned=2">',
  '<svg onload="window.__pwned=3"></svg>',
  '<svg><script>window.__pwned=4</script></svg>',
  '<iframe srcdoc="<script>parent.__pwned=5</script>"></iframe>',
  '<a href="javascript:window.__pwned=6">click</a>',
  '<ScRiPt>window.__pwned=7</sCrIpT>',
  '&lt;script&gt;window.__pwned=8&lt;/script&gt;',
  '&#60;img src=x onerror=window.__pwned=9&#62;',
  '<img src=x onerror=window.__pwned=10',
  '<<script>script>window.__pwned=11<</script>/script>',
  '<div style="background:url(javascript:window.__pwned=12)">styled</div>',
  '<div style="width:expression(window.__pwned=13)">expr</div>',
  "<style>@import 'javascript:window.__pwned=14';</style>",
  '<body onload=window.__pwned=15>',
  '<input autofocus onfocus=window.__pwned=16>',
  '<details open ontoggle=window.__pwned=17>',
  '<video><source onerror="window.__pwned=18"></video>',
  '<object data="javascript:window.__pwned=19"></object>',
  '<embed src="javascript:window.__pwned=20">',
  '<math><mtext><table><mglyph><style><img src=x onerror=window.__pwned=21>',
  '<noscript><p title="</noscript><img src=x onerror=window.__pwned=22>">',
  '"><script>window.__pwned=23</script>',
  "'><img src=x onerror=window.__pwned=24>",
  'javascript:window.__pwned=25',
  '<a href="jav&#x09;ascript:window.__pwned=26">tab</a>',
  '<meta http-equiv="refresh" content="0;url=javascript:window.__pwned=27">',
  '<base href="javascript:window.__pwned=28//">',
  '<form action="javascript:window.__pwned=29"><button>go</button></form>',
  '<template><img src=x onerror=window.__pwned=30></template>',
  '<img src="x" onerror="&#119;indow.__pwned=31">',
  '<scr<script>ipt>window.__pwned=32</script>',
  '\\u003cscript\\u003ewindow.__pwned=33\\u003c/script\\u003e',
  '<img src=x onerror=alert(34)>',
  '<svg><animate onbegin=window.__pwned=35 attributeName=x dur=1s>',
  '%3Cscript%3Ewindow.__pwned=37%3C/script%3E',
  '<marquee onstart=window.__pwned=38>marquee</marquee>',
  "{{constructor.constructor('window.__pwned=39')()}}",
  "<img src=x onerror=window['__pw'+'ned']=40>",
  '<iframe src="data:text/html,<script>top.__pwned=41</script>"></iframe>',
  '<IMG SRC=JaVaScRiPt:window.__pwned=42>',
  '<img """><script>window.__pwned=43</script>">',
  '<svg/onload=window.__pwned=44>',
  '<script src=data:,window.__pwned=45></script>',
  '<x onclick=window.__pwned=46 contenteditable>click me</x>',
  '<textarea><script>window.__pwned=47</script></textarea>',
  '<!--<img src="--><img src=x onerror=window.__pwned=48//">',
  '<a href="&#106;avascript:window.__pwned=49">entity</a>',
  '<script>confirm(50)</script>',
];

// Links a backend might try: the database refuses the unsafe ones at INSERT
// (events_link_safe); the safe ones must render as <a>.
const LINKS = [
  ['javascript:window.__pwned=101', false],
  ['JaVaScRiPt:window.__pwned=102', false],
  ['data:text/html,<script>parent.__pwned=103</script>', false],
  ['vbscript:msgbox(104)', false],
  ['//evil.example/105', false],
  ['/\\evil.example/106', false],
  [' javascript:window.__pwned=107', false],
  ['java\tscript:window.__pwned=108', false],
  ['https://example.com/"><script>window.__pwned=109</script>', false],
  ['/inbox/110', true],
  ['https://example.com/messages/111?x=1#y', true],
  ['http://example.com:8080/112', true],
];

// The same vectors written straight into notify.notifications, past the worker's sanitizer
// and the database's link check, to prove the page itself renders text as text. The
// event_type column gets a vector too. Unsafe links must render as no link at all.
const RAW_LINKS = [
  'javascript:window.__pwned=201',
  'JAVASCRIPT:window.__pwned=202',
  ' javascript:window.__pwned=203',
  'java\tscript:window.__pwned=204',
  'data:text/html,<script>parent.__pwned=205</script>',
  'vbscript:msgbox(206)',
  '//evil.example/207',
  '/\\evil.example/208',
  'https://user:pw@evil.example/209',
  'file:///etc/passwd',
  '"><img src=x onerror=window.__pwned=211>',
  '/ok/212',
  'https://example.com/ok/213',
];

function rawLinkSafe(link) {
  return link === '/ok/212' || link === 'https://example.com/ok/213';
}

// ---- the scenarios -----------------------------------------------------------------

async function scenarioFirstLoad(page) {
  const resp = await page.goto(`${BASE}/demo/`, { waitUntil: 'load' });
  check(resp && resp.status() === 200, `GET /demo/ answered ${resp && resp.status()}`);
  const csp = resp.headers()['content-security-policy'] || '';
  log(`CSP of /demo/: ${csp}`);
  check(/script-src 'self'/.test(csp), 'the demo page has no script-src CSP');
  await waitStatus(page, 'live', 15000);
  check((await pageIds(page)).length === 0, 'a fresh database shows notifications');
  check((await page.textContent('#unread')).trim() === '0', 'unread is not 0 on a fresh database');
  const button = await page.$('#desktop');
  check(button !== null, 'no desktop notifications button');
  log('first load: live, empty list');
}

async function scenarioAppearLatency(page) {
  const samples = [];
  for (let i = 0; i < 5; i++) {
    const body = `latency probe ${i} ${Date.now()}`;
    await page.evaluate((b) => {
      window.__appeared = null;
      const obs = new MutationObserver(() => {
        for (const p of document.querySelectorAll('#list .body')) {
          if (p.textContent === b) {
            window.__appeared = Date.now();
            obs.disconnect();
            return;
          }
        }
      });
      obs.observe(document.getElementById('list'), { childList: true, subtree: true });
    }, body);
    const t0 = Date.now();
    const ev = await enqueue(body);
    await page.waitForFunction(() => window.__appeared !== null, null, { timeout: 10000, polling: 20 });
    const ms = (await page.evaluate(() => window.__appeared)) - t0;
    samples.push(ms);
    await stored([ev]);
    log(`sample ${i}: enqueue -> on the page in ${ms} ms (status ${await status(page)})`);
  }
  const sorted = [...samples].sort((a, b) => a - b);
  console.log(
    `FIGURES appear latency (INSERT -> <li> in the browser, ${samples.length} samples): ` +
      `first ${samples[0]} ms, median ${sorted[Math.floor(sorted.length / 2)]} ms, max ${sorted[sorted.length - 1]} ms`,
  );
  check(samples[0] < APPEAR_LIMIT_MS, `the first notification took ${samples[0]} ms (limit ${APPEAR_LIMIT_MS})`);
  check(sorted[Math.floor(sorted.length / 2)] < APPEAR_LIMIT_MS, `median ${sorted} over the limit`);
  check((await page.textContent('#unread')).trim() === String(samples.length), 'unread count is not the number shown');
  await waitShown(page, await dbIds(), 5000);
}

async function scenarioXss(page) {
  // 1. Through the real pipeline (worker sanitizer + constraints).
  const eventIds = [];
  for (let i = 0; i < VECTORS.length; i++) {
    eventIds.push(await enqueue(`XSS-${i + 1} ${VECTORS[i]} end`));
  }
  let refused = 0;
  const linkEvents = [];
  for (const [link, safe] of LINKS) {
    try {
      linkEvents.push([await enqueue(`link probe ${JSON.stringify(link)}`, link), link, safe]);
      check(safe, `the database accepted the unsafe link ${JSON.stringify(link)}`);
    } catch (e) {
      if (e instanceof AssertionError) throw e;
      check(!safe, `the database refused the safe link ${JSON.stringify(link)}: ${e.message}`);
      check(/events_link_safe/.test(e.message), `unexpected error for ${JSON.stringify(link)}: ${e.message}`);
      refused++;
    }
  }
  const outcomes = await processed([...eventIds, ...linkEvents.map((x) => x[0])]);
  const stored = Object.values(outcomes).filter((o) => o.outcome === 'stored');
  const invalid = Object.values(outcomes).filter((o) => o.outcome === 'invalid');
  log(
    `pipeline corpus: ${VECTORS.length} body vectors + ${LINKS.length} links; ${stored.length} stored, ` +
      `${invalid.length} invalid (no text left), ${refused} links refused at INSERT`,
  );

  // 2. Straight into notify.notifications, unsanitized.
  const raw = [];
  await db.query('BEGIN');
  for (let i = 0; i < VECTORS.length; i++) {
    const body = `RAW-${i + 1} ${VECTORS[i]}`;
    const link = RAW_LINKS[i % RAW_LINKS.length];
    const type = i % 5 === 0 ? `<img src=x onerror=window.__pwned=${300 + i}>` : 'system_alert';
    const r = await db.query(
      `INSERT INTO notify.notifications (user_id, event_id, event_type, body, link, created_at)
       VALUES ($1, $2, $3, $4, $5, now()) RETURNING id`,
      [USER, -1000000 - i, type, body, link],
    );
    raw.push({ id: Number(r.rows[0].id), body, link, type });
  }
  const maxRaw = Math.max(...raw.map((x) => x.id));
  // Announce them as the worker does, so the read service's cache and stream hear of them.
  await db.query("SELECT pg_notify('notifyd_notifications', $1)", [JSON.stringify([[USER, maxRaw]])]);
  await db.query('COMMIT');

  const all = await dbIds();
  await waitShown(page, all, 15000);
  await sleep(1500); // let anything that would fire later (onerror, onload, timers) fire

  // The text is shown, exactly as stored, and links only where safe.
  const rendered = await page.$$eval('#list > li', (lis) =>
    lis.map((li) => ({
      id: li.dataset.id,
      body: li.querySelector('.body') ? li.querySelector('.body').textContent : null,
      type: li.querySelector('.type') ? li.querySelector('.type').textContent : null,
      href: li.querySelector('a') ? li.querySelector('a').getAttribute('href') : null,
    })),
  );
  const byId = new Map(rendered.map((r) => [r.id, r]));
  for (const o of stored) {
    const r = byId.get(String(o.id));
    check(r, `stored notification ${o.id} is not shown`);
    check(r.body === o.body, `notification ${o.id}: shown ${JSON.stringify(r.body)}, stored ${JSON.stringify(o.body)}`);
    check(/^(XSS-\d+|link probe)/.test(r.body), `notification ${o.id}: the text is missing: ${r.body}`);
    if (o.link) check(r.href !== null, `notification ${o.id}: safe link ${o.link} not rendered`);
  }
  for (const x of raw) {
    const r = byId.get(String(x.id));
    check(r, `raw notification ${x.id} is not shown`);
    check(r.body === x.body, `raw ${x.id}: shown ${JSON.stringify(r.body)}, stored ${JSON.stringify(x.body)}`);
    if (x.type !== 'system_alert') check(r.type === x.type, `raw ${x.id}: event_type not shown as text`);
    if (rawLinkSafe(x.link)) check(r.href !== null, `raw ${x.id}: safe link ${x.link} not rendered`);
    else check(r.href === null, `raw ${x.id}: unsafe link ${JSON.stringify(x.link)} rendered as ${r.href}`);
  }
  await assertOwnMarkupOnly(page);
  const vectors = VECTORS.length * 2 + LINKS.length + RAW_LINKS.length;
  console.log(
    `FIGURES xss corpus: ${VECTORS.length} body vectors (through the worker and raw), ${LINKS.length} enqueue links, ` +
      `${RAW_LINKS.length} raw links (${vectors} cases); nothing ran, no dialog, no foreign element`,
  );
}

// A digest (what the rate limit held back) shows its counts per type, as text; a type name
// that is markup stays text. Written straight into notify.notifications, as the worker's
// sweep writes it, and announced the same way.
async function scenarioDigest(page) {
  const hostile = '<img src=x onerror=window.__pwned=1>';
  const digest = {
    total: 13,
    counts: { new_message: 9, status_change: 3, [hostile]: 1 },
    first_at: new Date().toISOString(),
    last_at: new Date().toISOString(),
  };
  const body = '13 more notifications while you were away: 9 new messages, 3 status changes';
  await db.query('BEGIN');
  const r = await db.query(
    `INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at, digest)
     VALUES ($1, NULL, 'digest', $2, now(), $3::jsonb) RETURNING id`,
    [USER, body, JSON.stringify(digest)],
  );
  const id = Number(r.rows[0].id);
  await db.query("SELECT pg_notify('notifyd_notifications', $1)", [JSON.stringify([[USER, id]])]);
  await db.query('COMMIT');
  await waitShown(page, await dbIds(), 10000);
  const shown = await page.$eval(`#list > li[data-id="${id}"]`, (li) => ({
    type: li.querySelector('.type').textContent,
    body: li.querySelector('.body').textContent,
    counts: [...li.querySelectorAll('.digest > li')].map((e) => [e.dataset.type, e.textContent]),
  }));
  check(shown.type === 'While you were away', `digest label ${JSON.stringify(shown.type)}`);
  check(shown.body === body, `digest body ${JSON.stringify(shown.body)}`);
  const want = [
    ['new_message', '9 \u00d7 New message'],
    ['status_change', '3 \u00d7 Status change'],
    [hostile, `1 \u00d7 ${hostile}`],
  ];
  check(JSON.stringify(shown.counts) === JSON.stringify(want), `digest counts ${JSON.stringify(shown.counts)}`);
  await assertOwnMarkupOnly(page);
  log('digest: counts per type rendered as text');
}

async function scenarioRestart(page) {
  await waitStatus(page, 'live', 20000);
  const before = await waitShown(page, await dbIds(), 5000);
  log(`restart: ${before.length} shown before the kill`);

  await control('kill-serve');
  const killedAt = Date.now();
  await waitStatus(page, ['reconnecting', 'polling', 'error'], 10000);
  log(`restart: page noticed in ${Date.now() - killedAt} ms (status ${await status(page)})`);

  const down = [];
  for (let i = 0; i < 5; i++) down.push(await enqueue(`while down ${i}`));
  await stored(down);
  await sleep(1000); // a few reconnect attempts fail against the dead port

  await control('start-serve');
  const upAt = Date.now();
  const after = [];
  for (let i = 0; i < 5; i++) after.push(await enqueue(`after restart ${i}`));
  await stored(after);

  const all = await dbIds();
  const shown = await waitShown(page, all, 30000);
  log(`restart: all ${shown.length} shown ${Date.now() - upAt} ms after the restart (status ${await status(page)})`);
  await waitStatus(page, 'live', 30000);
  log(`restart: live again ${Date.now() - upAt} ms after the restart`);

  const last = await enqueue('after live again');
  await stored([last]);
  const final = await waitShown(page, await dbIds(), 5000);
  await sleep(1500); // would any late replay duplicate something?
  const again = await pageIds(page);
  check(again.length === final.length && new Set(again).size === again.length, `duplicates after settling: ${dups(again)}`);
  check(again.length === all.length + 1, `expected ${all.length + 1} notifications, the page shows ${again.length}`);
  const sorted = [...again].map(Number);
  check(
    sorted.every((v, i) => i === 0 || sorted[i - 1] > v),
    'the list is not newest first',
  );
  const slowPath = await page.evaluate(() => window.__statusLog.splice(0).join(' > '));
  log(`restart: status path ${slowPath}`);

  // Again, with serve back at once: the page usually resumes on the stream itself
  // (Last-Event-ID), before it falls back to polling. Either way: every one exactly once.
  await control('kill-serve');
  const quick = [];
  for (let i = 0; i < 3; i++) quick.push(await enqueue(`quick restart, while down ${i}`));
  await control('start-serve');
  for (let i = 0; i < 3; i++) quick.push(await enqueue(`quick restart, after ${i}`));
  await stored(quick);
  const all2 = await dbIds();
  await waitShown(page, all2, 30000);
  await waitStatus(page, 'live', 30000);
  await sleep(1000);
  const settled = await pageIds(page);
  check(settled.length === all2.length && new Set(settled).size === settled.length, `quick restart: ${settled.length} shown of ${all2.length}, duplicates ${dups(settled)}`);
  const quickPath = await page.evaluate(() => window.__statusLog.splice(0).join(' > '));
  log(`quick restart: status path ${quickPath}`);
  console.log(
    `FIGURES restart: ${settled.length} notifications, each exactly once; 16 enqueued around two SIGKILLs of serve`,
  );
}

async function scenarioReload(page) {
  await page.reload({ waitUntil: 'load' });
  await waitStatus(page, 'live', 15000);
  const newest = (await dbIds()).slice(-50).map(String);
  const shown = await waitShown(page, newest, 10000);
  check(shown.join() === [...newest].reverse().join(), 'after a reload the list is not the newest page, newest first');
  const r = await db.query('SELECT count(*)::int AS n FROM notify.notifications WHERE user_id = $1 AND read_at IS NULL', [USER]);
  const unread = (await page.textContent('#unread')).trim();
  check(unread === String(r.rows[0].n), `unread shows ${unread}, the database has ${r.rows[0].n}`);
  log(`reload: newest ${shown.length} shown, unread ${unread}`);
}

// Desktop notifications, with a stand-in for the browser's Notification API (headless
// Chromium has no notification UI): the button asks for permission, and once it is
// granted a notification that arrives while the tab is in the background raises one.
// And a browser without the API: no button, the page works.
async function scenarioDesktop(page) {
  const browser = page.context().browser();
  const ctx = await browser.newContext();
  await ctx.addInitScript(() => {
    window.__notes = [];
    window.__asked = 0;
    class FakeNotification {
      constructor(title, options) {
        window.__notes.push({ title, body: options && options.body, tag: options && options.tag });
      }
      close() {}
      static requestPermission(callback) {
        window.__asked++;
        FakeNotification.permission = 'granted';
        if (callback) callback('granted');
        return Promise.resolve('granted');
      }
    }
    FakeNotification.permission = 'default';
    Object.defineProperty(window, 'Notification', { value: FakeNotification, configurable: true, writable: true });
    document.hasFocus = () => false; // a background tab
  });
  const p = await ctx.newPage();
  const errors = [];
  p.on('pageerror', (e) => errors.push(e.message));
  await p.goto(`${BASE}/demo/`);
  await waitStatus(p, 'live', 15000);
  const button = p.locator('#desktop');
  check(await button.isVisible(), 'the "Enable desktop notifications" button is not shown');
  check((await button.textContent()).trim() === 'Enable desktop notifications', 'the button text is wrong');
  await button.click();
  await p.waitForFunction(() => document.getElementById('desktop').hidden, null, { timeout: 5000 });
  check((await p.evaluate(() => window.__asked)) >= 1, 'the button did not ask for permission');
  const body = `desktop probe ${Date.now()}`;
  const ev = await enqueue(body, null, 'system_alert');
  await stored([ev]);
  await p.waitForFunction((b) => window.__notes.some((n) => n.body === b), body, { timeout: 5000 });
  const note = (await p.evaluate(() => window.__notes)).find((n) => n.body === body);
  check(note.title === 'System alert', `desktop notification title ${JSON.stringify(note.title)}`);
  check(errors.length === 0, `page errors: ${errors}`);
  await ctx.close();

  const bare = await browser.newContext();
  await bare.addInitScript(() => {
    delete window.Notification;
  });
  const q = await bare.newPage();
  q.on('pageerror', (e) => errors.push(e.message));
  await q.goto(`${BASE}/demo/`);
  await waitStatus(q, 'live', 15000);
  check(!(await q.locator('#desktop').isVisible()), 'the button is shown without a Notification API');
  await waitShown(q, (await dbIds()).slice(-50), 10000);
  check(errors.length === 0, `page errors without a Notification API: ${errors}`);
  await bare.close();
  await waitShown(page, await dbIds(), 5000);
  log('desktop notifications: asked, raised one with the text; no API: no button, no error');
}

// ---- main --------------------------------------------------------------------------

const SCENARIOS = [
  ['first load', scenarioFirstLoad],
  ['appear latency', scenarioAppearLatency],
  ['xss corpus', scenarioXss],
  ['desktop notifications', scenarioDesktop],
  ['digest', scenarioDigest],
  ['kill and restart serve', scenarioRestart],
  ['reload', scenarioReload],
];

async function main() {
  if (!existsSync(CHROMIUM)) fail(`no browser at ${CHROMIUM}: apt-get install -y chromium (scripts/test.sh does)`);
  await db.connect();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
  const failures = [];
  try {
    const context = await browser.newContext();
    // Record CSP violations (our own page must cause none).
    await context.addInitScript(() => {
      // Every #status text the page goes through, for the log.
      window.__statusLog = [];
      document.addEventListener('DOMContentLoaded', () => {
        const el = document.getElementById('status');
        if (!el) return;
        new MutationObserver(() => {
          const s = el.textContent.trim();
          if (window.__statusLog[window.__statusLog.length - 1] !== s) window.__statusLog.push(s);
        }).observe(el, { childList: true, characterData: true, subtree: true });
      });
      window.__csp = [];
      document.addEventListener('securitypolicyviolation', (e) => {
        window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`);
      });
    });
    const page = await context.newPage();
    page.on('dialog', async (d) => {
      failures.push(`a dialog opened (${d.type()}: ${d.message()})`);
      await d.dismiss().catch(() => {});
    });
    page.on('pageerror', (e) => failures.push(`uncaught page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') log(`console ${m.type()}: ${m.text()}`);
    });

    for (const [name, run] of SCENARIOS) {
      const t = Date.now();
      log(`--- ${name}`);
      await run(page);
      check(failures.length === 0, failures.join('; '));
      log(`ok: ${name} (${Date.now() - t} ms)`);
    }
    await assertOwnMarkupOnly(page);
    check(failures.length === 0, failures.join('; '));
  } finally {
    await browser.close().catch(() => {});
    await db.end().catch(() => {});
  }
  console.log(`browser scenarios: ${SCENARIOS.length} passed, 0 failed`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`[browser] FAIL: ${e instanceof AssertionError ? e.message : e.stack || e}`);
    process.exit(1);
  },
);
