// GENERATED FILE, do not edit: the @notifyd/client core (clients/js/src), bundled for the
// demo page. Regenerate with `cd clients/js && npm ci && npm run demo`; tests/js_client.rs
// fails when this copy differs from the sources.

// src/sse.ts
function sseParser(onEvent, onRetry) {
  let buf = "";
  let data = [];
  let type = "";
  let id = null;
  const line = (l) => {
    if (l === "") {
      if (data.length) onEvent({ type: type || "message", data: data.join("\n"), id });
      data = [];
      type = "";
      id = null;
      return;
    }
    if (l[0] === ":") return;
    const i = l.indexOf(":");
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? "" : l.slice(i + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") type = value;
    else if (field === "id") id = value;
    else if (field === "retry" && /^\d+$/.test(value)) onRetry(+value);
  };
  return (chunk) => {
    buf += chunk;
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === buf.length) break;
      line(buf.slice(start, i));
      if (c === "\r" && buf[i + 1] === "\n") i++;
      start = i + 1;
    }
    buf = buf.slice(start);
  };
}

// src/engine.ts
var LONG_POLL_S = 25;
var SHORT_POLL_MS = 3e3;
var STALL_MS = 45e3;
var HEALTHY_MS = 5e3;
var FAILURES_BEFORE_POLL = 3;
var STREAM_RETRY_MS = 5e3;
var UNREAD_REFRESH_MS = 3e4;
var sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(done, ms);
  function done() {
    clearTimeout(t);
    signal?.removeEventListener("abort", done);
    resolve();
  }
  signal?.addEventListener("abort", done);
});
var backoff = (attempt) => Math.round(Math.min(15e3, 250 * 2 ** Math.max(0, attempt - 1)) * (0.5 + Math.random() / 2));
function claims(jwt) {
  try {
    const b = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b + "===".slice((b.length + 3) % 4));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    return {};
  }
}
var Tokens = class {
  constructor(source) {
    this.source = source;
    this.jwt = null;
    this.renewAt = 0;
    this.pending = null;
  }
  get(fresh = false) {
    if (!fresh && this.jwt !== null && Date.now() < this.renewAt) return Promise.resolve(this.jwt);
    if (!this.pending) {
      this.pending = Promise.resolve().then(this.source).then((jwt) => {
        if (typeof jwt !== "string" || !jwt) throw new Error("getToken() returned no token");
        const c = claims(jwt);
        const now = Date.now();
        const exp = Number(c.exp) * 1e3;
        const life = exp - (Number(c.iat) * 1e3 || now);
        const left = exp - now;
        const ms = life > 0 ? left > 0 ? Math.min(life, left) : life : left > 0 ? left : 6e4;
        this.renewAt = now + ms - Math.min(6e4, Math.max(2e3, ms / 4), ms / 2);
        return this.jwt = jwt;
      }).finally(() => this.pending = null);
    }
    return this.pending;
  }
};
async function authedGet(o, tokens, path, headers, signal) {
  for (let fresh = false; ; fresh = true) {
    const jwt = await tokens.get(fresh);
    const r = await o.fetch(o.baseUrl + path, {
      headers: { ...headers, Authorization: "Bearer " + jwt },
      cache: "no-store",
      signal
    });
    if (r.status !== 401 || fresh) return r;
  }
}
var isReset = (o) => o.status === 410 || o.status === 400 && o.code === "invalid_cursor";
async function outcome(r) {
  let code = null;
  try {
    code = (await r.json()).error.code;
  } catch {
  }
  const s = Number(r.headers.get("Retry-After"));
  return { status: r.status, code, retry: s > 0 ? Math.min(s, 300) * 1e3 : null };
}
var Engine = class {
  constructor(o, tokens, sink) {
    this.o = o;
    this.tokens = tokens;
    this.sink = sink;
    this.stop = new AbortController();
    this.longPoll = true;
    this.retryHint = null;
  }
  close() {
    this.stop.abort();
  }
  get closed() {
    return this.stop.signal.aborted;
  }
  get(path, headers, signal) {
    return authedGet(this.o, this.tokens, path, headers, signal);
  }
  /** One page after `after` (or the newest page), applied to the sink. */
  async page(after, wait = 0) {
    const q = new URLSearchParams({ limit: String(this.o.pageSize) });
    if (after !== null) q.set("after", String(after));
    if (wait > 0 && this.longPoll) q.set("wait", String(wait));
    const ctrl = new AbortController();
    const abort = () => ctrl.abort();
    this.stop.signal.addEventListener("abort", abort);
    const t = setTimeout(abort, (wait + 15) * 1e3);
    try {
      const r = await this.get("/api/notifications?" + q, { Accept: "application/json" }, ctrl.signal);
      if (!r.ok) return outcome(r);
      const p = await r.json();
      this.sink.add(p.notifications, after !== null);
      this.sink.unread(p.unread_count, p.next_after);
      const full = p.notifications.length >= this.o.pageSize;
      if (after === null) this.sink.complete(!full);
      return { status: 200, code: null, retry: null, full };
    } catch {
      return { status: 0, code: null, retry: null };
    } finally {
      clearTimeout(t);
      this.stop.signal.removeEventListener("abort", abort);
    }
  }
  /** One stream connection, until it ends. */
  async stream() {
    const res = { status: 0, code: null, retry: null, opened: false, delivered: 0, renewed: false };
    const ctrl = new AbortController();
    const abort = () => ctrl.abort();
    this.stop.signal.addEventListener("abort", abort);
    let stall;
    let renew;
    let refresh;
    const alive = () => {
      clearTimeout(stall);
      stall = setTimeout(abort, STALL_MS);
    };
    try {
      alive();
      const after = String(this.sink.cursor() ?? 0);
      const r = await this.get(
        "/api/notifications/stream?after=" + after,
        { Accept: "text/event-stream", "Last-Event-ID": after },
        ctrl.signal
      );
      if (!r.ok || !(r.headers.get("Content-Type") || "").startsWith("text/event-stream") || !r.body) {
        Object.assign(res, r.ok ? { status: 415 } : await outcome(r));
        r.body?.cancel().catch(() => {
        });
        return res;
      }
      res.opened = true;
      this.sink.conn("live");
      const old = this.tokens.jwt;
      renew = setTimeout(
        () => this.tokens.get(true).then(
          (jwt) => {
            if (jwt === old) return;
            res.renewed = true;
            abort();
          },
          () => {
          }
          // keep this stream; it ends at expiry and the loop tries again
        ),
        Math.max(0, this.tokens.renewAt - Date.now())
      );
      const count = () => this.page(this.sink.cursor());
      count();
      refresh = setInterval(count, UNREAD_REFRESH_MS);
      const push = sseParser(
        (e) => {
          if (e.type !== "notification") return;
          try {
            const n = JSON.parse(e.data);
            this.sink.add([n], true);
            res.delivered++;
          } catch {
          }
        },
        (ms) => this.retryHint = ms
      );
      const reader = r.body.getReader();
      const text = new TextDecoder();
      for (; ; ) {
        const { value, done } = await reader.read();
        if (done) break;
        alive();
        push(text.decode(value, { stream: true }));
      }
    } catch {
    } finally {
      clearTimeout(stall);
      clearTimeout(renew);
      clearInterval(refresh);
      this.stop.signal.removeEventListener("abort", abort);
    }
    return res;
  }
  /** Runs until close(). */
  async run() {
    const signal = this.stop.signal;
    let stream = this.o.transport !== "poll";
    let failures = 0;
    let streamRetry = STREAM_RETRY_MS;
    let nextStreamTry = 0;
    const fail = async (o, state) => {
      failures++;
      this.sink.conn(state);
      await sleep(o.retry ?? Math.min(backoff(failures), this.retryHint ?? 15e3), signal);
    };
    while (!signal.aborted) {
      if (this.sink.cursor() === null) {
        const o = await this.page(null);
        if (o.status !== 200) await fail(o, "error");
        else failures = 0;
        continue;
      }
      if (stream) {
        const started = Date.now();
        const o = await this.stream();
        if (signal.aborted) break;
        if (o.renewed) continue;
        if (isReset(o)) {
          this.sink.reset();
          continue;
        }
        const refused = o.status === 404 || o.status === 405 || o.status === 415 || o.code === "too_many_streams" || o.code === "streams_full";
        const healthy = o.opened && (o.delivered > 0 || Date.now() - started >= HEALTHY_MS);
        if (healthy) {
          failures = 0;
          streamRetry = STREAM_RETRY_MS;
          if (Date.now() - started < HEALTHY_MS) await sleep(backoff(1), signal);
          continue;
        }
        if (refused || failures + 1 >= FAILURES_BEFORE_POLL) {
          stream = false;
          failures = 0;
          nextStreamTry = Date.now() + streamRetry;
          streamRetry = Math.min(streamRetry * 2, 6e4);
          continue;
        }
        await fail(o, "reconnecting");
      } else {
        const due = this.o.transport === "poll" ? LONG_POLL_S : Math.ceil((nextStreamTry - Date.now()) / 1e3);
        const o = await this.page(this.sink.cursor(), Math.max(1, Math.min(LONG_POLL_S, due)));
        if (signal.aborted) break;
        if (isReset(o)) {
          this.sink.reset();
          continue;
        }
        if (o.status === 400 && o.code === "unknown_parameter" && this.longPoll) {
          this.longPoll = false;
          continue;
        }
        if (o.status !== 200) {
          await fail(o, "error");
          continue;
        }
        failures = 0;
        this.sink.conn("polling");
        if (this.o.transport !== "poll" && Date.now() >= nextStreamTry) stream = true;
        else if (!o.full && !this.longPoll) await sleep(SHORT_POLL_MS, signal);
      }
    }
  }
};

// src/index.ts
function createNotifications(options) {
  const o = {
    baseUrl: (options.baseUrl || "").replace(/\/+$/, ""),
    pageSize: Math.min(200, Math.max(1, options.pageSize || 50)),
    transport: options.transport || "auto",
    fetch: options.fetch || ((input, init) => fetch(input, init))
  };
  const tokens = new Tokens(options.getToken);
  const stop = new AbortController();
  const listeners = /* @__PURE__ */ new Set();
  const byId = /* @__PURE__ */ new Map();
  let max = null;
  let complete = false;
  let hist = 0;
  let histTop = null;
  let histDone = false;
  let loading = null;
  let channel = null;
  let state = { items: [], unreadCount: 0, connection: "connecting", leader: false, hasMore: false };
  const safely = (f) => {
    try {
      f();
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  };
  const set = (patch) => {
    state = { ...state, ...patch, hasMore: !complete && !histDone && max !== null };
    listeners.forEach(safely);
  };
  const clear = () => {
    byId.clear();
    max = null;
    hist = 0;
    histTop = null;
    histDone = complete = false;
  };
  const merge = (list) => {
    const fresh = [];
    for (const n of list) {
      const id = n && n.id;
      if (!Number.isSafeInteger(id) || id <= 0 || byId.has(id)) continue;
      byId.set(id, n);
      fresh.push(n);
      if (max === null || id > max) max = id;
    }
    return fresh;
  };
  const sorted = () => [...byId.values()].sort((a, b) => a.id - b.id);
  const publish = (patch, items = [], extra = {}) => {
    set(items.length || extra.reset ? { ...patch, items: sorted() } : patch);
    channel?.postMessage({
      t: "up",
      lead: true,
      items,
      ...extra,
      unread: state.unreadCount,
      conn: state.connection,
      complete
    });
  };
  const notify = (fresh, leader) => {
    const f = options.onNotification;
    if (f) for (const n of fresh) safely(() => f(n, leader));
  };
  const sink = {
    add(list, live) {
      const fresh = merge(list);
      if (!fresh.length) return;
      let unread = state.unreadCount;
      if (live) {
        for (const n of fresh) if (n.read_at == null) unread++;
      }
      publish({ unreadCount: unread }, fresh, live ? { live } : {});
      if (live) notify(fresh, true);
    },
    unread(count, upTo) {
      if (max === null || upTo > max) max = upTo;
      for (const n of byId.values()) if (n.id > upTo && n.read_at == null) count++;
      if (count !== state.unreadCount) publish({ unreadCount: count });
    },
    conn(c) {
      if (c !== state.connection) publish({ connection: c });
    },
    reset() {
      clear();
      publish({ unreadCount: 0 }, [], { reset: true });
    },
    cursor: () => max,
    complete(done) {
      complete = done;
      publish({});
    }
  };
  const onMessage = (m) => {
    if (stop.signal.aborted) return;
    if (m.t === "hello") {
      channel?.postMessage({
        t: "up",
        lead: state.leader,
        items: state.items,
        unread: state.unreadCount,
        conn: state.connection,
        complete
      });
      return;
    }
    if (m.t !== "up") return;
    const fromLeader = m.lead && !state.leader;
    if (fromLeader && m.reset) clear();
    const fresh = merge(m.items || []);
    const patch = fresh.length || fromLeader && m.reset ? { items: sorted() } : {};
    if (fromLeader) {
      patch.unreadCount = m.unread;
      patch.connection = m.conn;
      complete = m.complete;
    }
    if (state.leader && fresh.length) {
      publish(patch, fresh);
    } else {
      set(patch);
    }
    if (fromLeader && m.live) notify(fresh, false);
  };
  let engine = null;
  const lead = () => {
    if (stop.signal.aborted) return;
    set({ leader: true });
    channel?.postMessage({ t: "hello" });
    engine = new Engine(o, tokens, sink);
    engine.run();
  };
  (async () => {
    let sub = "";
    for (let attempt = 1; !stop.signal.aborted; attempt++) {
      try {
        sub = String(claims(await tokens.get()).sub ?? "");
        break;
      } catch {
        set({ connection: "error" });
        await sleep(backoff(attempt), stop.signal);
      }
    }
    if (stop.signal.aborted) return;
    const locks = typeof navigator === "object" ? navigator.locks : void 0;
    if (options.shareTabs === false || !locks || typeof BroadcastChannel !== "function") return lead();
    const key = `notifyd ${o.baseUrl} ${sub}`;
    channel = new BroadcastChannel(key);
    channel.onmessage = (e) => onMessage(e.data);
    channel.postMessage({ t: "hello" });
    locks.request(key, { signal: stop.signal }, () => {
      lead();
      return new Promise((resolve) => stop.signal.addEventListener("abort", resolve));
    }).catch(() => {
    });
  })();
  const loadMore = async () => {
    if (!state.hasMore || stop.signal.aborted) return;
    if (histTop === null) histTop = state.items.length ? state.items[0].id : 0;
    const r = await authedGet(o, tokens, `/api/notifications?after=${hist}&limit=${o.pageSize}`, {
      Accept: "application/json"
    });
    if (r.status === 410) {
      hist = 0;
      return;
    }
    if (!r.ok) throw new Error(`notifyd: loading history failed with HTTP ${r.status}`);
    const p = await r.json();
    if (histTop === null) return;
    hist = p.next_after;
    histDone = p.notifications.length < o.pageSize || hist >= histTop;
    merge(p.notifications);
    set({ items: sorted() });
  };
  return {
    getState: () => state,
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    loadMore() {
      return loading ?? (loading = loadMore().finally(() => loading = null));
    },
    close() {
      if (stop.signal.aborted) return;
      stop.abort();
      engine?.close();
      channel?.close();
      channel = null;
      set({ connection: "closed", leader: false });
    }
  };
}
export {
  createNotifications
};
