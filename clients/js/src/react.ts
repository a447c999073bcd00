// @notifyd/client/react: the client as a React hook. One client per mounted hook, made in
// an effect and closed on unmount (StrictMode's double mount makes and closes one more,
// which only hands the tab leadership over once). The latest options' callbacks are used,
// so an inline `getToken` arrow does not reconnect on every render; changing `baseUrl`,
// `pageSize`, `shareTabs` or `transport` makes a new client.

import { useEffect, useState, useSyncExternalStore, useRef } from 'react';
import { createNotifications } from './index.js';
import type { NotificationsClient, Options, State } from './index.js';

export type { Connection, Notification, Options, State } from './index.js';

export interface UseNotifications extends State {
  /** Read one more page of older history; resolves when it is merged. */
  loadMore: () => Promise<void>;
}

const INITIAL: State = { items: [], unreadCount: 0, connection: 'connecting', leader: false, hasMore: false };
const none = () => () => {};
const initial = () => INITIAL;

export function useNotifications(options: Options): UseNotifications {
  const latest = useRef(options);
  latest.current = options;
  const [client, setClient] = useState<NotificationsClient | null>(null);
  const { baseUrl, pageSize, shareTabs, transport } = options;
  useEffect(() => {
    const c = createNotifications({
      ...latest.current,
      getToken: () => latest.current.getToken(),
      onNotification: (n, leader) => latest.current.onNotification?.(n, leader),
    });
    setClient(c);
    return () => c.close();
  }, [baseUrl, pageSize, shareTabs, transport]);
  const state = useSyncExternalStore(client ? client.subscribe : none, client ? client.getState : initial, initial);
  const loadMore = () => (client ? client.loadMore() : Promise.resolve());
  return { ...state, loadMore };
}
