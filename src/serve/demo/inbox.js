// notifyd demo inbox, on the browser client of clients/js (its bundle, notifyd-client.js,
// is generated and served next to this file). No framework, no build step for this file.
//
// The client does the protocol: the newest page, then one stream per user for all tabs of
// this origin (the leader tab holds it and shares what arrives), resume by Last-Event-ID
// after any drop, long-poll when streaming is refused, backoff with jitter, token renewal
// before expiry from GET /demo/token. This file only renders its state.
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
//   #role    leader (this tab holds the connection) | follower
//   a digest's <li> also holds <ul class="digest"> with one <li data-type="<event_type>">
//   per type it sums up (its count and the type's label)
import { createNotifications } from '/demo/notifyd-client.js';

const TITLE = document.title;
const el = {
  list: document.getElementById('list'),
  status: document.getElementById('status'),
  unread: document.getElementById('unread'),
  empty: document.getElementById('empty'),
  user: document.getElementById('user'),
  desktop: document.getElementById('desktop'),
  role: document.getElementById('role'),
};
// The client's connection states, as this page names them.
const STATUS = { connecting: 'reconnecting', live: 'live', polling: 'polling', reconnecting: 'reconnecting', error: 'error', closed: 'error' };
const LABELS = {
  new_message: 'New message',
  status_change: 'Status change',
  system_alert: 'System alert',
  security_alert: 'Security alert',
  digest: 'While you were away',
};
const label = (t) => (typeof t === 'string' && Object.prototype.hasOwnProperty.call(LABELS, t) ? LABELS[t] : String(t));

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
      return url.origin === window.location.origin ? url.pathname + url.search + url.hash : null;
    }
    url = new URL(link);
  } catch (_) {
    return null;
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return null;
  if (url.username !== '' || url.password !== '') return null;
  return url.href;
}

// A digest's counts as [event_type, count] pairs, largest first; [] for anything that is
// not a digest object with whole-number counts.
function digestCounts(digest) {
  if (digest === null || typeof digest !== 'object' || typeof digest.counts !== 'object' || digest.counts === null) return [];
  const pairs = [];
  for (const [type, n] of Object.entries(digest.counts)) {
    if (Number.isSafeInteger(n) && n > 0) pairs.push([type, n]);
  }
  pairs.sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  return pairs;
}

function render(item) {
  const li = document.createElement('li');
  li.dataset.id = String(item.id);
  li.className = item.read_at == null ? 'item unread' : 'item';
  const meta = document.createElement('div');
  meta.className = 'meta';
  const type = document.createElement('span');
  type.className = 'type';
  type.textContent = label(item.event_type);
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
  const counts = digestCounts(item.digest);
  if (counts.length > 0) {
    const ul = document.createElement('ul');
    ul.className = 'digest';
    for (const [type, n] of counts) {
      const entry = document.createElement('li');
      entry.dataset.type = type;
      entry.textContent = n + ' \u00d7 ' + label(type);
      ul.appendChild(entry);
    }
    li.appendChild(ul);
  }
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

// ---- desktop notifications (raised by the leader tab only, so once per user) ---------

let desktop = false;
function setupDesktop() {
  if (!('Notification' in window) || typeof window.Notification !== 'function') return;
  const sync = () => {
    const p = window.Notification.permission;
    desktop = p === 'granted';
    el.desktop.hidden = p !== 'default';
  };
  sync();
  el.desktop.addEventListener('click', () => {
    let asked;
    try {
      asked = window.Notification.requestPermission(sync); // older Safari: callback only
    } catch (_) {
      asked = null;
    }
    if (asked && typeof asked.then === 'function') asked.then(sync, sync);
  });
}

function desktopNotify(item, leader) {
  if (!desktop || !leader) return;
  if (document.visibilityState === 'visible' && document.hasFocus()) return;
  try {
    const n = new window.Notification(LABELS[item.event_type] || 'Notification', {
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

// ---- the client ------------------------------------------------------------------------

async function demoToken() {
  const r = await fetch('/demo/token', { cache: 'no-store', credentials: 'same-origin' });
  if (!r.ok) throw new Error('GET /demo/token: HTTP ' + r.status);
  const t = await r.json();
  el.user.textContent = 'Demo user ' + t.user_id;
  return t.token;
}

const shown = new Map(); // id -> <li>
let last = null;
function update(state) {
  if (state === last) return;
  last = state;
  const ids = new Set();
  for (const n of state.items) ids.add(n.id);
  for (const [id, li] of shown) {
    if (!ids.has(id)) {
      li.remove();
      shown.delete(id);
    }
  }
  // items are ascending: insert each new one above the first lower id (usually at the top).
  for (const n of state.items) {
    if (shown.has(n.id)) continue;
    const li = render(n);
    let before = null;
    for (const child of el.list.children) {
      if (Number(child.dataset.id) < n.id) {
        before = child;
        break;
      }
    }
    el.list.insertBefore(li, before);
    shown.set(n.id, li);
  }
  el.empty.hidden = shown.size > 0;
  const status = STATUS[state.connection] || 'error';
  if (el.status.textContent !== status) {
    el.status.textContent = status;
    el.status.dataset.state = status;
  }
  el.unread.textContent = String(state.unreadCount);
  document.title = state.unreadCount > 0 ? '(' + state.unreadCount + ') ' + TITLE : TITLE;
  const role = state.leader ? 'leader' : 'follower';
  if (el.role.textContent !== role) el.role.textContent = role;
}

setupDesktop();
const client = createNotifications({ getToken: demoToken, onNotification: desktopNotify });
client.subscribe(() => update(client.getState()));
update(client.getState());
