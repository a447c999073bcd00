// notifyd demo inbox: one plain script, no framework, no build step.
//
// Flow: GET /demo/token, then GET /api/notifications (the newest page), then live over
// Server-Sent Events read with fetch() + ReadableStream, so the token stays in the
// Authorization header and never lands in a URL. Each (re)connection resumes from the
// highest id seen, with `Last-Event-ID` and `?after=`. A dropped stream is reopened with
// exponential backoff and jitter; after STREAM_FAILURES_BEFORE_POLL failed attempts in a row
// the page polls GET /api/notifications?after=<last id> instead (a long poll with wait=25,
// or a short poll every few seconds when the server refuses `wait`), and tries the stream
// again later. A Set of shown ids makes sure nothing is ever shown twice.
//
// Safety: every string from the server goes into the DOM through textContent (never
// innerHTML); a link becomes an <a> only when it is a same-origin path ("/inbox/7") or an
// http(s) URL, with rel="noopener noreferrer". No inline script or style: the page's CSP
// allows neither.
//
// DOM contract (the browser tests rely on it):
//   #list    one <li data-id="<id>"> per notification, newest (highest id) first
//   #status  text is live | polling | reconnecting | error
//   #unread  the unread count
'use strict';

(function () {
  const API = '/api/notifications';
  const STREAM = '/api/notifications/stream';
  const TOKEN = '/demo/token';
  const PAGE_LIMIT = 50; // the server's default page size
  const LONG_POLL_SECS = 25;
  const SHORT_POLL_MS = 3000;
  const STREAM_FAILURES_BEFORE_POLL = 3;
  // While polling, try the stream again after this long (doubling up to the max).
  const STREAM_RETRY_FIRST_MS = 5000;
  const STREAM_RETRY_MAX_MS = 60000;
  // A stream that stays open this long, or delivers anything, was not a failure.
  const STREAM_HEALTHY_MS = 5000;
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_MAX_MS = 15000;
  // No byte at all (not even a heartbeat comment) for this long: the connection is dead.
  const STALL_MS = 45000;
  // While live, re-read the unread count this often (events carry no count, and the
  // backend marks notifications read on its own): one empty poll, answered from memory.
  const UNREAD_REFRESH_MS = 30000;
  const TITLE = document.title;

  const el = {
    list: document.getElementById('list'),
    status: document.getElementById('status'),
    unread: document.getElementById('unread'),
    empty: document.getElementById('empty'),
    user: document.getElementById('user'),
    desktop: document.getElementById('desktop'),
  };

  const state = {
    token: null,
    tokenRefreshAt: 0,
    userId: null,
    lastId: null, // highest notification id seen (or the server's next_after)
    shown: new Set(),
    unread: 0,
    longPoll: true, // false once the server refuses `wait`
    serverRetryMs: null, // from an SSE `retry:` field
    desktop: false, // permission granted
  };

  class HttpError extends Error {
    constructor(status, code, what) {
      super(what + ': HTTP ' + status + (code ? ' (' + code + ')' : ''));
      this.status = status;
      this.code = code;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // Exponential backoff with jitter, capped by the server's `retry:` hint when it sent one.
  function backoff(attempt) {
    const cap = state.serverRetryMs !== null ? Math.max(state.serverRetryMs, BACKOFF_BASE_MS) : BACKOFF_MAX_MS;
    const ms = Math.min(cap, BACKOFF_BASE_MS * Math.pow(2, Math.max(0, attempt - 1)));
    return Math.round(ms * (0.5 + Math.random() * 0.5));
  }

  // ---- view ------------------------------------------------------------------------

  function setStatus(s) {
    if (el.status.textContent !== s) {
      el.status.textContent = s;
      el.status.dataset.state = s;
    }
  }

  function setUnread(n) {
    n = Number(n);
    if (!Number.isFinite(n) || n < 0) return;
    state.unread = n;
    el.unread.textContent = String(n);
    document.title = n > 0 ? '(' + n + ') ' + TITLE : TITLE;
  }

  const LABELS = {
    new_message: 'New message',
    status_change: 'Status change',
    system_alert: 'System alert',
  };

  // The href to render for `link`, or null for no link at all. Accepted: a path on this
  // origin starting with a single "/" ("//host" and "/\host" resolve elsewhere and are
  // refused), or an absolute http(s) URL without user info.
  function safeHref(link) {
    if (typeof link !== 'string' || link === '' || link.length > 2048) return null;
    if (/[\u0000-\u001f\u007f\\]/.test(link)) return null;
    let url;
    try {
      if (link[0] === '/') {
        if (link[1] === '/') return null;
        url = new URL(link, window.location.origin);
        if (url.origin !== window.location.origin) return null;
        return url.pathname + url.search + url.hash;
      }
      url = new URL(link);
    } catch (_) {
      return null;
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') return null;
    if (url.username !== '' || url.password !== '') return null;
    return url.href;
  }

  function render(item, id) {
    const li = document.createElement('li');
    li.dataset.id = String(id);
    li.className = item.read_at == null ? 'item unread' : 'item';

    const meta = document.createElement('div');
    meta.className = 'meta';
    const type = document.createElement('span');
    type.className = 'type';
    const et = typeof item.event_type === 'string' ? item.event_type : '';
    type.textContent = Object.prototype.hasOwnProperty.call(LABELS, et) ? LABELS[et] : et;
    meta.appendChild(type);
    if (typeof item.created_at === 'string') {
      const time = document.createElement('time');
      time.className = 'time';
      time.dateTime = item.created_at;
      const d = new Date(item.created_at);
      time.textContent = Number.isNaN(d.getTime()) ? item.created_at : d.toLocaleString();
      meta.appendChild(time);
    }
    li.appendChild(meta);

    const body = document.createElement('p');
    body.className = 'body';
    body.textContent = typeof item.body === 'string' ? item.body : '';
    li.appendChild(body);

    const href = safeHref(item.link);
    if (href !== null) {
      const a = document.createElement('a');
      a.className = 'link';
      a.href = href;
      a.rel = 'noopener noreferrer';
      a.textContent = item.link;
      li.appendChild(a);
    }
    return li;
  }

  // Show one notification unless it is already shown. `live`: it arrived after the first
  // page (counts as new unread, may raise a desktop notification). Returns true if shown.
  function add(item, live) {
    const id = Number(item && item.id);
    if (!Number.isSafeInteger(id) || id <= 0) return false;
    if (state.lastId === null || id > state.lastId) state.lastId = id;
    if (state.shown.has(id)) return false;
    state.shown.add(id);
    const li = render(item, id);
    // Keep the list sorted by id, newest first; new ones almost always go on top.
    let before = null;
    for (const child of el.list.children) {
      if (Number(child.dataset.id) < id) {
        before = child;
        break;
      }
    }
    el.list.insertBefore(li, before);
    el.empty.hidden = true;
    if (live) {
      if (item.read_at == null) setUnread(state.unread + 1);
      desktopNotify(item);
    }
    return true;
  }

  function clearList() {
    el.list.replaceChildren();
    state.shown.clear();
    state.lastId = null;
    el.empty.hidden = false;
  }

  // ---- desktop notifications ---------------------------------------------------------

  function setupDesktop() {
    if (!('Notification' in window) || typeof window.Notification !== 'function') return;
    const sync = () => {
      const p = window.Notification.permission;
      state.desktop = p === 'granted';
      el.desktop.hidden = p !== 'default';
    };
    sync();
    el.desktop.addEventListener('click', () => {
      let asked;
      try {
        // Older Safari only has the callback form.
        asked = window.Notification.requestPermission(sync);
      } catch (_) {
        asked = null;
      }
      if (asked && typeof asked.then === 'function') asked.then(sync, sync);
    });
  }

  function desktopNotify(item) {
    if (!state.desktop) return;
    if (document.visibilityState === 'visible' && document.hasFocus()) return;
    try {
      const et = typeof item.event_type === 'string' ? item.event_type : '';
      const n = new window.Notification(LABELS[et] || 'Notification', {
        body: typeof item.body === 'string' ? item.body : '',
        tag: 'notifyd-' + item.id,
      });
      n.onclick = () => {
        window.focus();
        n.close();
      };
    } catch (_) {
      // Some browsers (Chrome on Android) only allow notifications from a service worker.
    }
  }

  // ---- API ---------------------------------------------------------------------------

  async function fetchToken() {
    const r = await fetch(TOKEN, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) throw new HttpError(r.status, null, 'token');
    const t = await r.json();
    if (!t || typeof t.token !== 'string' || t.token === '') throw new Error('no token');
    state.token = t.token;
    const ttl = Number(t.expires_in) > 0 ? Number(t.expires_in) : 300;
    state.tokenRefreshAt = Date.now() + ttl * 800; // refresh at 80% of its life
    if (t.user_id != null && String(t.user_id) !== state.userId) {
      state.userId = String(t.user_id);
      el.user.textContent = 'Demo user ' + state.userId;
    }
  }

  async function bearer() {
    if (state.token === null || Date.now() >= state.tokenRefreshAt) await fetchToken();
    return 'Bearer ' + state.token;
  }

  async function errorCode(r) {
    try {
      const j = await r.json();
      return j && j.error && typeof j.error.code === 'string' ? j.error.code : null;
    } catch (_) {
      return null;
    }
  }

  // An authenticated GET; a 401 gets one retry with a fresh token.
  async function authedFetch(url, extraHeaders, signal) {
    for (let attempt = 0; ; attempt++) {
      const headers = Object.assign({ Authorization: await bearer() }, extraHeaders);
      const r = await fetch(url, { headers, cache: 'no-store', signal });
      if (r.status === 401 && attempt === 0) {
        state.token = null;
        continue;
      }
      return r;
    }
  }

  // The cursor is gone (410 cursor_expired) or unknown (400 invalid_cursor): start over.
  const isReset = (status, code) =>
    status === 410 || (status === 400 && code === 'invalid_cursor');

  function retryAfterMs(r) {
    const s = Number(r.headers.get('Retry-After'));
    return Number.isFinite(s) && s > 0 ? Math.min(s, 300) * 1000 : null;
  }

  async function loadFirstPage() {
    const r = await authedFetch(API, { Accept: 'application/json' });
    if (!r.ok) throw new HttpError(r.status, await errorCode(r), 'list');
    const page = await r.json();
    for (const n of page.notifications || []) add(n, false);
    const next = Number(page.next_after);
    if (Number.isSafeInteger(next) && (state.lastId === null || next > state.lastId)) {
      state.lastId = next;
    }
    if (state.lastId === null) state.lastId = 0;
    setUnread(page.unread_count);
  }

  async function restart() {
    clearList();
    await loadFirstPage();
  }

  // ---- SSE ---------------------------------------------------------------------------

  // A line parser for text/event-stream (the WHATWG rules: CR, LF or CRLF line ends,
  // "field: value", comments start with ":", a blank line dispatches the event).
  function sseParser(onEvent) {
    let buf = '';
    let data = [];
    let type = '';
    let id = null;
    function line(l) {
      if (l === '') {
        if (data.length > 0) onEvent({ type: type || 'message', data: data.join('\n'), id });
        data = [];
        type = '';
        id = null;
        return;
      }
      if (l[0] === ':') return; // a comment: the heartbeat
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') data.push(value);
      else if (field === 'event') type = value;
      else if (field === 'id') {
        if (value.indexOf('\u0000') < 0) id = value;
      } else if (field === 'retry') {
        if (/^[0-9]+$/.test(value)) state.serverRetryMs = Math.min(Number(value), BACKOFF_MAX_MS);
      }
    }
    return function push(text) {
      buf += text;
      let start = 0;
      for (let i = 0; i < buf.length; i++) {
        const c = buf[i];
        if (c !== '\n' && c !== '\r') continue;
        if (c === '\r' && i + 1 === buf.length) break; // a CRLF may be split across chunks
        line(buf.slice(start, i));
        if (c === '\r' && buf[i + 1] === '\n') i++;
        start = i + 1;
      }
      buf = buf.slice(start);
    };
  }

  // One stream connection, until it ends. Resolves to what happened.
  async function streamOnce() {
    const ctrl = new AbortController();
    let stall = null;
    const alive = () => {
      clearTimeout(stall);
      stall = setTimeout(() => ctrl.abort(), STALL_MS);
    };
    const after = String(state.lastId || 0);
    const result = { opened: false, delivered: 0, status: 0, code: null, retryMs: null };
    alive();
    try {
      const r = await authedFetch(
        STREAM + '?after=' + encodeURIComponent(after),
        { Accept: 'text/event-stream', 'Last-Event-ID': after },
        ctrl.signal,
      );
      const type = r.headers.get('Content-Type') || '';
      if (!r.ok || !type.startsWith('text/event-stream')) {
        result.status = r.status;
        result.code = r.ok ? null : await errorCode(r);
        result.retryMs = retryAfterMs(r);
        if (r.ok && r.body) r.body.cancel().catch(() => {});
        return result;
      }
      result.opened = true;
      setStatus('live');
      const push = sseParser((ev) => {
        if (ev.type !== 'notification') return;
        let item;
        try {
          item = JSON.parse(ev.data);
        } catch (_) {
          return;
        }
        if (add(item, true)) result.delivered++;
        const evId = Number(ev.id);
        if (Number.isSafeInteger(evId) && evId > (state.lastId || 0)) state.lastId = evId;
      });
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        alive();
        push(value);
      }
    } catch (_) {
      // Network error, server gone, or our stall timer: the caller reconnects.
    } finally {
      clearTimeout(stall);
    }
    return result;
  }

  // ---- polling -----------------------------------------------------------------------

  // One poll, a long one (held up to `waitSecs` while nothing is new) when the server
  // accepts `wait`. Resolves to { ok, again (ask again at once), waitMs, reset }.
  async function pollOnce(waitSecs) {
    const q = new URLSearchParams({ after: String(state.lastId || 0) });
    if (state.longPoll) q.set('wait', String(waitSecs));
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), (waitSecs + 15) * 1000);
    try {
      const r = await authedFetch(API + '?' + q, { Accept: 'application/json' }, ctrl.signal);
      if (!r.ok) {
        const code = await errorCode(r);
        if (isReset(r.status, code)) return { reset: true };
        if (r.status === 400 && state.longPoll && code === 'unknown_parameter') {
          state.longPoll = false; // no long-poll on this server: short polls
          return { ok: true, again: true };
        }
        return { ok: false, waitMs: retryAfterMs(r) };
      }
      const page = await r.json();
      const items = page.notifications || [];
      for (const n of items) add(n, true);
      const next = Number(page.next_after);
      if (Number.isSafeInteger(next) && next > (state.lastId || 0)) state.lastId = next;
      setUnread(page.unread_count);
      return { ok: true, again: items.length >= PAGE_LIMIT || state.longPoll };
    } catch (_) {
      return { ok: false, waitMs: null };
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- main loop ---------------------------------------------------------------------

  async function live() {
    let mode = 'stream';
    let failures = 0; // consecutive failed attempts (stream or poll)
    let streamRetryMs = STREAM_RETRY_FIRST_MS;
    let nextStreamTry = 0;
    for (;;) {
      if (mode === 'stream') {
        const started = Date.now();
        const res = await streamOnce();
        if (isReset(res.status, res.code)) {
          await restartSafely();
          continue;
        }
        const unsupported = res.status === 404 || res.status === 405 || (res.status >= 200 && res.status < 300);
        const healthy = res.opened && (res.delivered > 0 || Date.now() - started >= STREAM_HEALTHY_MS);
        if (healthy) {
          failures = 0;
          streamRetryMs = STREAM_RETRY_FIRST_MS;
        } else {
          failures++;
        }
        if (unsupported || failures >= STREAM_FAILURES_BEFORE_POLL) {
          mode = 'poll';
          failures = 0;
          nextStreamTry = Date.now() + streamRetryMs;
          streamRetryMs = Math.min(streamRetryMs * 2, STREAM_RETRY_MAX_MS);
          continue;
        }
        setStatus('reconnecting');
        await sleep(res.retryMs !== null ? res.retryMs : backoff(Math.max(1, failures)));
      } else {
        // Hold the long poll no longer than the next stream attempt is due.
        const due = Math.ceil((nextStreamTry - Date.now()) / 1000);
        const res = await pollOnce(Math.max(1, Math.min(LONG_POLL_SECS, due)));
        if (res.reset) {
          await restartSafely();
          continue;
        }
        if (res.ok) {
          failures = 0;
          setStatus('polling');
          if (Date.now() >= nextStreamTry) {
            mode = 'stream';
            continue;
          }
          if (!res.again) await sleep(SHORT_POLL_MS);
        } else {
          failures++;
          setStatus('error');
          await sleep(res.waitMs !== null ? res.waitMs : backoff(failures));
        }
      }
    }
  }

  async function restartSafely() {
    for (let attempt = 1; ; attempt++) {
      try {
        await restart();
        return;
      } catch (_) {
        setStatus('error');
        await sleep(backoff(attempt));
      }
    }
  }

  // The unread count while the stream is live (polls bring it with every page).
  async function refreshUnread() {
    if (el.status.textContent !== 'live' || state.lastId === null) return;
    try {
      const r = await authedFetch(API + '?after=' + encodeURIComponent(String(state.lastId)), {
        Accept: 'application/json',
      });
      if (!r.ok) return;
      const page = await r.json();
      for (const n of page.notifications || []) add(n, true);
      setUnread(page.unread_count);
    } catch (_) {
      // The stream's own reconnect logic deals with a server that is gone.
    }
  }

  async function main() {
    setupDesktop();
    setInterval(refreshUnread, UNREAD_REFRESH_MS);
    for (let attempt = 1; ; attempt++) {
      try {
        await fetchToken();
        await loadFirstPage();
        break;
      } catch (_) {
        setStatus('error');
        await sleep(backoff(attempt));
      }
    }
    await live();
  }

  main();
})();
