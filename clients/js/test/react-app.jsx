// The React app of the browser tests (tests/browser/client.test.mjs): the hook's state,
// rendered. Bundled from the built package (dist/) with React by scripts/bundle.mjs test-app.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { useNotifications } from '../dist/react.js';

async function getToken() {
  const r = await fetch('/demo/token', { cache: 'no-store' });
  if (!r.ok) throw new Error(`GET /demo/token: HTTP ${r.status}`);
  return (await r.json()).token;
}

function Inbox() {
  const { items, unreadCount, connection, leader, hasMore, loadMore } = useNotifications({ getToken });
  return (
    <main>
      <p id="unread">{unreadCount}</p>
      <p id="conn">{connection}</p>
      <p id="role">{leader ? 'leader' : 'follower'}</p>
      <button id="more" disabled={!hasMore} onClick={() => loadMore()}>
        Load more
      </button>
      <ul id="items">
        {items.map((n) => (
          <li key={n.id} data-id={n.id}>
            {n.body}
          </li>
        ))}
      </ul>
    </main>
  );
}

createRoot(document.getElementById('root')).render(
  <StrictMode>
    <Inbox />
  </StrictMode>,
);
