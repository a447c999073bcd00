// @notifyd/client: a user's notifications from `notifyd serve`, kept in one list per tab.
//
// Tabs of one origin share one connection per user and server: the tab that holds the Web
// Lock `notifyd <baseUrl> <sub>` is the leader and runs the Engine (stream, or long-poll);
// it posts every change on a BroadcastChannel of the same name. Every other tab follows.
// When the leader goes (tab closed, close()), the lock passes to a waiting tab, which
// resumes from the highest id it holds. Without Web Locks or BroadcastChannel (or with
// `shareTabs: false`), every tab is its own leader.
//
// Invariants, in every tab:
// * `items` is unique by id and ascending; a notification seen twice (a replay after a
//   reconnect, two tabs' snapshots) is dropped by id;
// * a tab that joins, and a new leader, ask all tabs for what they hold (`hello`) and
//   merge the answers, so the lists of tabs opened at different times end up equal;
// * the unread count and the connection state are the leader's; only the leader's
//   messages change them in a follower;
// * resuming from the highest id a tab holds never skips: the server replays everything
//   above it, and the merge drops what was already there.

import { authedGet, backoff, claims, Engine, sleep, Tokens } from './engine.js';
import type { EngineOptions, Sink } from './engine.js';
import type { Connection, Notification, Page } from './types.js';

export type { Connection, Digest, Notification, Page } from './types.js';

export interface Options {
  /** Returns the backend's JWT for this user (called again before it expires, and on a 401). */
  getToken: () => string | Promise<string>;
  /** Where `notifyd serve` is: `''` (default) for this origin, or `https://notify.example.com`. */
  baseUrl?: string;
  /** Notifications per request, 1 to 200 (default 50). */
  pageSize?: number;
  /** One connection for all tabs of this origin (default true). */
  shareTabs?: boolean;
  /** `auto` (default): stream, long-poll when streaming is refused or fails; `poll`: long-poll only. */
  transport?: 'auto' | 'poll';
  /** Called in every tab for each notification that arrives after the first page. `leader`
   *  is true in exactly one tab: raise desktop notifications or sounds only there. */
  onNotification?: (n: Notification, leader: boolean) => void;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface State {
  /** Unique, ascending by id. */
  items: readonly Notification[];
  /** All of this user's unread notifications, as the server counts them. */
  unreadCount: number;
  connection: Connection;
  /** This tab holds the connection for all tabs. */
  leader: boolean;
  /** Older history can be read with loadMore(). */
  hasMore: boolean;
}

export interface NotificationsClient {
  getState(): State;
  /** Called after every change of getState(); returns the unsubscribe function. */
  subscribe(listener: () => void): () => void;
  /** Read one more page of older history (see the README for the order). */
  loadMore(): Promise<void>;
  /** Stop: closes the connection, hands the leadership to another tab. */
  close(): void;
}

/** A message on the channel: a change (`up`) or a request for everyone's list (`hello`). */
type Msg =
  | { t: 'hello' }
  | {
      t: 'up';
      lead: boolean;
      items: Notification[];
      live?: boolean;
      reset?: boolean;
      unread: number;
      conn: Connection;
      complete: boolean;
    };

export function createNotifications(options: Options): NotificationsClient {
  const o: EngineOptions = {
    baseUrl: (options.baseUrl || '').replace(/\/+$/, ''),
    pageSize: Math.min(200, Math.max(1, options.pageSize || 50)),
    transport: options.transport || 'auto',
    fetch: options.fetch || ((input, init) => fetch(input, init)),
  };
  const tokens = new Tokens(options.getToken);
  const stop = new AbortController();
  const listeners = new Set<() => void>();
  const byId = new Map<number, Notification>();
  let max: number | null = null;
  let complete = false; // the first page held all there is
  let hist = 0; // history cursor (ascending from the oldest end)
  let histTop: number | null = null; // history is read up to here
  let histDone = false;
  let loading: Promise<void> | null = null;
  let channel: BroadcastChannel | null = null;
  let state: State = { items: [], unreadCount: 0, connection: 'connecting', leader: false, hasMore: false };

  // A throwing listener or callback must not stop the connection: it is reported
  // asynchronously instead (window.onerror, the console).
  const safely = (f: () => void) => {
    try {
      f();
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  };
  const set = (patch: Partial<State>) => {
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

  /** Merge into the list; returns the notifications that were not there. */
  const merge = (list: readonly Notification[]) => {
    const fresh: Notification[] = [];
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

  /** Leader: change the state, tell the other tabs. */
  const publish = (patch: Partial<State>, items: Notification[] = [], extra: { live?: boolean; reset?: boolean } = {}) => {
    set(items.length || extra.reset ? { ...patch, items: sorted() } : patch);
    channel?.postMessage({
      t: 'up',
      lead: true,
      items,
      ...extra,
      unread: state.unreadCount,
      conn: state.connection,
      complete,
    } satisfies Msg);
  };

  const notify = (fresh: Notification[], leader: boolean) => {
    const f = options.onNotification;
    if (f) for (const n of fresh) safely(() => f(n, leader));
  };

  const sink: Sink = {
    add(list, live) {
      const fresh = merge(list);
      if (!fresh.length) return;
      let unread = state.unreadCount;
      if (live) for (const n of fresh) if (n.read_at == null) unread++;
      publish({ unreadCount: unread }, fresh, live ? { live } : {});
      if (live) notify(fresh, true);
    },
    unread(count, upTo) {
      // Everything up to `upTo` is known (a page's next_after), even with no notification.
      if (max === null || upTo > max) max = upTo;
      // The count is exact up to `upTo`; add what arrived above it meanwhile.
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
    },
  };

  const onMessage = (m: Msg) => {
    if (stop.signal.aborted) return;
    if (m.t === 'hello') {
      channel?.postMessage({
        t: 'up',
        lead: state.leader,
        items: state.items as Notification[],
        unread: state.unreadCount,
        conn: state.connection,
        complete,
      } satisfies Msg);
      return;
    }
    if (m.t !== 'up') return;
    // Only the leader's word changes the count, the state, or resets the list.
    const fromLeader = m.lead && !state.leader;
    if (fromLeader && m.reset) clear();
    const fresh = merge(m.items || []);
    const patch: Partial<State> = fresh.length || (fromLeader && m.reset) ? { items: sorted() } : {};
    if (fromLeader) {
      patch.unreadCount = m.unread;
      patch.connection = m.conn;
      complete = m.complete;
    }
    if (state.leader && fresh.length) {
      publish(patch, fresh); // a late tab's older notifications: pass them on
    } else {
      set(patch);
    }
    if (fromLeader && m.live) notify(fresh, false);
  };

  let engine: Engine | null = null;
  const lead = () => {
    if (stop.signal.aborted) return;
    set({ leader: true });
    channel?.postMessage({ t: 'hello' } satisfies Msg);
    engine = new Engine(o, tokens, sink);
    engine.run();
  };

  (async () => {
    // The token first: its `sub` names the lock, so that one user's tabs share, and only theirs.
    let sub = '';
    for (let attempt = 1; !stop.signal.aborted; attempt++) {
      try {
        sub = String(claims(await tokens.get()).sub ?? '');
        break;
      } catch {
        set({ connection: 'error' });
        await sleep(backoff(attempt), stop.signal);
      }
    }
    if (stop.signal.aborted) return;
    const locks = typeof navigator === 'object' ? navigator.locks : undefined;
    if (options.shareTabs === false || !locks || typeof BroadcastChannel !== 'function') return lead();
    const key = `notifyd ${o.baseUrl} ${sub}`;
    channel = new BroadcastChannel(key);
    channel.onmessage = (e) => onMessage(e.data);
    channel.postMessage({ t: 'hello' } satisfies Msg);
    locks
      .request(key, { signal: stop.signal }, () => {
        lead();
        // Held until close() or the tab goes away.
        return new Promise((resolve) => stop.signal.addEventListener('abort', resolve));
      })
      .catch(() => {}); // AbortError: closed while waiting
  })();

  const loadMore = async () => {
    if (!state.hasMore || stop.signal.aborted) return;
    if (histTop === null) histTop = state.items.length ? state.items[0].id : 0;
    const r = await authedGet(o, tokens, `/api/notifications?after=${hist}&limit=${o.pageSize}`, {
      Accept: 'application/json',
    });
    if (r.status === 410) {
      hist = 0; // retention passed the history cursor: from the oldest end again
      return;
    }
    if (!r.ok) throw new Error(`notifyd: loading history failed with HTTP ${r.status}`);
    const p: Page = await r.json();
    if (histTop === null) return; // reset meanwhile
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
      return (loading ??= loadMore().finally(() => (loading = null)));
    },
    close() {
      if (stop.signal.aborted) return;
      stop.abort();
      engine?.close();
      channel?.close();
      channel = null;
      set({ connection: 'closed', leader: false });
    },
  };
}
