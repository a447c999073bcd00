// The network side: tokens, the first page, the stream, the long-poll fallback, backoff.
// One Engine runs per user per origin (in the leader tab); it never holds state of its
// own beyond the connection: the notifications, the cursor (the highest id known) and the
// unread count live in the Sink, so that a new leader resumes from where any tab was.
//
// Invariants:
// * every request carries `Authorization: Bearer`, never `?access_token=`; a 401 asks
//   getToken() for a new token once, then counts as a failure (backoff);
// * the stream and the polls always resume from the sink's cursor (Last-Event-ID /
//   `after`), so a reconnect, a token renewal or a new leader never skips a notification;
//   repeats are dropped by id in the sink;
// * the unread count comes only from the server's `unread_count`; between answers, only
//   notifications new to the sink add to it (see Sink.unread).

import { sseParser } from './sse.js';
import type { Connection, Notification, Page } from './types.js';

export interface Sink {
  /** Merge notifications; `live`: they arrived after the first page. */
  add(items: Notification[], live: boolean): void;
  /** The server's count, true for every notification with an id up to `upTo`. */
  unread(count: number, upTo: number): void;
  conn(c: Connection): void;
  /** The cursor expired (410) or is unknown (400 invalid_cursor): drop everything. */
  reset(): void;
  /** The highest id known, or null before the first page. */
  cursor(): number | null;
  /** The first page held everything retained (no older history). */
  complete(done: boolean): void;
}

export interface EngineOptions {
  baseUrl: string;
  pageSize: number;
  transport: 'auto' | 'poll';
  fetch: typeof fetch;
}

const LONG_POLL_S = 25;
const SHORT_POLL_MS = 3000;
const STALL_MS = 45000; // no byte, not even the 15 s heartbeat: the connection is dead
const HEALTHY_MS = 5000; // a stream open this long (or that delivered) was no failure
const FAILURES_BEFORE_POLL = 3;
const STREAM_RETRY_MS = 5000; // while polling, try the stream again (doubling to 60 s)
const UNREAD_REFRESH_MS = 30000; // the stream carries no count: an empty poll this often

export const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done);
  });

/** Exponential backoff (250 ms doubling to 15 s) with jitter: half to all of it. */
export const backoff = (attempt: number) =>
  Math.round(Math.min(15000, 250 * 2 ** Math.max(0, attempt - 1)) * (0.5 + Math.random() / 2));

/** The payload of a JWT, decoded but not verified (the server verifies). */
export function claims(jwt: string): Record<string, unknown> {
  try {
    const b = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bin = atob(b + '==='.slice((b.length + 3) % 4));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    return {};
  }
}

/**
 * The current token and when to renew it: a quarter of its lifetime before `exp`
 * (between 2 s and 60 s). The lifetime is `exp - iat` when the token has `iat`, measured
 * from when it arrived, so a client clock that is off does not matter.
 */
export class Tokens {
  jwt: string | null = null;
  renewAt = 0;
  private pending: Promise<string> | null = null;
  constructor(private source: () => string | Promise<string>) {}

  get(fresh = false): Promise<string> {
    if (!fresh && this.jwt !== null && Date.now() < this.renewAt) return Promise.resolve(this.jwt);
    if (!this.pending) {
      this.pending = Promise.resolve()
        .then(this.source)
        .then((jwt) => {
          if (typeof jwt !== 'string' || !jwt) throw new Error('getToken() returned no token');
          const c = claims(jwt);
          const now = Date.now();
          const exp = Number(c.exp) * 1000;
          // What is left of it: by `exp - iat`, and by this clock when that says less
          // (a cached token handed out again); by this clock alone only if sane.
          const life = exp - (Number(c.iat) * 1000 || now);
          const left = exp - now;
          const ms = life > 0 ? (left > 0 ? Math.min(life, left) : life) : left > 0 ? left : 60000;
          this.renewAt = now + ms - Math.min(60000, Math.max(2000, ms / 4), ms / 2);
          return (this.jwt = jwt);
        })
        .finally(() => (this.pending = null));
    }
    return this.pending;
  }
}

/** An authenticated GET; one retry with a fresh token on 401. */
export async function authedGet(
  o: EngineOptions,
  tokens: Tokens,
  path: string,
  headers: Record<string, string>,
  signal?: AbortSignal,
): Promise<Response> {
  for (let fresh = false; ; fresh = true) {
    const jwt = await tokens.get(fresh);
    const r = await o.fetch(o.baseUrl + path, {
      headers: { ...headers, Authorization: 'Bearer ' + jwt },
      cache: 'no-store',
      signal,
    });
    if (r.status !== 401 || fresh) return r;
  }
}

interface Outcome {
  status: number;
  code: string | null;
  retry: number | null;
}

const isReset = (o: Outcome) => o.status === 410 || (o.status === 400 && o.code === 'invalid_cursor');

async function outcome(r: Response): Promise<Outcome> {
  let code = null;
  try {
    code = (await r.json()).error.code;
  } catch {
    // not the JSON error body
  }
  const s = Number(r.headers.get('Retry-After'));
  return { status: r.status, code, retry: s > 0 ? Math.min(s, 300) * 1000 : null };
}

export class Engine {
  private stop = new AbortController();
  private longPoll = true;
  private retryHint: number | null = null;

  constructor(
    private o: EngineOptions,
    private tokens: Tokens,
    private sink: Sink,
  ) {}

  close() {
    this.stop.abort();
  }

  get closed() {
    return this.stop.signal.aborted;
  }

  private get(path: string, headers: Record<string, string>, signal: AbortSignal) {
    return authedGet(this.o, this.tokens, path, headers, signal);
  }

  /** One page after `after` (or the newest page), applied to the sink. */
  private async page(after: number | null, wait = 0): Promise<Outcome & { full?: boolean }> {
    const q = new URLSearchParams({ limit: String(this.o.pageSize) });
    if (after !== null) q.set('after', String(after));
    if (wait > 0 && this.longPoll) q.set('wait', String(wait));
    const ctrl = new AbortController();
    const abort = () => ctrl.abort();
    this.stop.signal.addEventListener('abort', abort);
    const t = setTimeout(abort, (wait + 15) * 1000);
    try {
      const r = await this.get('/api/notifications?' + q, { Accept: 'application/json' }, ctrl.signal);
      if (!r.ok) return outcome(r);
      const p: Page = await r.json();
      this.sink.add(p.notifications, after !== null);
      this.sink.unread(p.unread_count, p.next_after);
      const full = p.notifications.length >= this.o.pageSize;
      if (after === null) this.sink.complete(!full);
      return { status: 200, code: null, retry: null, full };
    } catch {
      return { status: 0, code: null, retry: null };
    } finally {
      clearTimeout(t);
      this.stop.signal.removeEventListener('abort', abort);
    }
  }

  /** One stream connection, until it ends. */
  private async stream(): Promise<Outcome & { opened: boolean; delivered: number; renewed: boolean }> {
    const res = { status: 0, code: null as string | null, retry: null as number | null, opened: false, delivered: 0, renewed: false };
    const ctrl = new AbortController();
    const abort = () => ctrl.abort();
    this.stop.signal.addEventListener('abort', abort);
    let stall: ReturnType<typeof setTimeout> | undefined;
    let renew: ReturnType<typeof setTimeout> | undefined;
    let refresh: ReturnType<typeof setInterval> | undefined;
    const alive = () => {
      clearTimeout(stall);
      stall = setTimeout(abort, STALL_MS);
    };
    try {
      alive();
      const after = String(this.sink.cursor() ?? 0);
      const r = await this.get(
        '/api/notifications/stream?after=' + after,
        { Accept: 'text/event-stream', 'Last-Event-ID': after },
        ctrl.signal,
      );
      if (!r.ok || !(r.headers.get('Content-Type') || '').startsWith('text/event-stream') || !r.body) {
        Object.assign(res, r.ok ? { status: 415 } : await outcome(r));
        r.body?.cancel().catch(() => {});
        return res;
      }
      res.opened = true;
      this.sink.conn('live');
      // Renew ahead of `exp`: get the new token first, then reconnect from the cursor at
      // once, so the switch costs one request and loses nothing.
      const old = this.tokens.jwt;
      renew = setTimeout(
        () =>
          this.tokens.get(true).then(
            (jwt) => {
              if (jwt === old) return; // the same token again: keep this stream until it ends
              res.renewed = true;
              abort();
            },
            () => {}, // keep this stream; it ends at expiry and the loop tries again
          ),
        Math.max(0, this.tokens.renewAt - Date.now()),
      );
      const count = () => this.page(this.sink.cursor());
      count();
      refresh = setInterval(count, UNREAD_REFRESH_MS);
      const push = sseParser(
        (e) => {
          if (e.type !== 'notification') return;
          try {
            const n: Notification = JSON.parse(e.data);
            this.sink.add([n], true);
            res.delivered++;
          } catch {
            // not JSON: skip it (the id still moves on with the next event)
          }
        },
        (ms) => (this.retryHint = ms),
      );
      const reader = r.body.getReader();
      const text = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        alive();
        push(text.decode(value, { stream: true }));
      }
    } catch {
      // network error, server gone, stall, renewal or close: the loop decides
    } finally {
      clearTimeout(stall);
      clearTimeout(renew);
      clearInterval(refresh);
      this.stop.signal.removeEventListener('abort', abort);
    }
    return res;
  }

  /** Runs until close(). */
  async run(): Promise<void> {
    const signal = this.stop.signal;
    let stream = this.o.transport !== 'poll';
    let failures = 0;
    let streamRetry = STREAM_RETRY_MS;
    let nextStreamTry = 0;
    const fail = async (o: Outcome, state: Connection) => {
      failures++;
      this.sink.conn(state);
      await sleep(o.retry ?? Math.min(backoff(failures), this.retryHint ?? 15000), signal);
    };
    while (!signal.aborted) {
      if (this.sink.cursor() === null) {
        const o = await this.page(null);
        if (o.status !== 200) await fail(o, 'error');
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
        // Refused outright: no stream here (a proxy, an old server) or none for us now.
        const refused =
          o.status === 404 ||
          o.status === 405 ||
          o.status === 415 ||
          o.code === 'too_many_streams' ||
          o.code === 'streams_full';
        const healthy = o.opened && (o.delivered > 0 || Date.now() - started >= HEALTHY_MS);
        if (healthy) {
          // Ended after a good run (shutdown, token expiry): resume at once; after a short
          // one that delivered, a moment later (a proxy that cuts every stream early).
          failures = 0;
          streamRetry = STREAM_RETRY_MS;
          if (Date.now() - started < HEALTHY_MS) await sleep(backoff(1), signal);
          continue;
        }
        if (refused || failures + 1 >= FAILURES_BEFORE_POLL) {
          stream = false;
          failures = 0;
          nextStreamTry = Date.now() + streamRetry;
          streamRetry = Math.min(streamRetry * 2, 60000);
          continue;
        }
        await fail(o, 'reconnecting');
      } else {
        const due = this.o.transport === 'poll' ? LONG_POLL_S : Math.ceil((nextStreamTry - Date.now()) / 1000);
        const o = await this.page(this.sink.cursor(), Math.max(1, Math.min(LONG_POLL_S, due)));
        if (signal.aborted) break;
        if (isReset(o)) {
          this.sink.reset();
          continue;
        }
        if (o.status === 400 && o.code === 'unknown_parameter' && this.longPoll) {
          this.longPoll = false; // a server without `wait`: short polls
          continue;
        }
        if (o.status !== 200) {
          await fail(o, 'error');
          continue;
        }
        failures = 0;
        this.sink.conn('polling');
        if (this.o.transport !== 'poll' && Date.now() >= nextStreamTry) stream = true;
        else if (!o.full && !this.longPoll) await sleep(SHORT_POLL_MS, signal);
      }
    }
  }
}
