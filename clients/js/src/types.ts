/** One notification, exactly as the read API returns it. Render `body` as text. */
export interface Notification {
  id: number;
  event_type: string;
  body: string;
  link: string | null;
  created_at: string;
  read_at: string | null;
  /** For a `digest` notification, what it sums up; null for every other one. */
  digest?: Digest | null;
}

/** What a digest notification sums up: events the rate limit held back, per type. */
export interface Digest {
  total: number;
  counts: Record<string, number>;
  first_at: string;
  last_at: string;
}

/** A page of `GET /api/notifications`. */
export interface Page {
  notifications: Notification[];
  next_after: number;
  unread_count: number;
}

/**
 * How this tab gets news: `live` (a stream is open, in this tab or in the leader tab),
 * `polling` (long-polls, when streaming is refused or keeps failing), `connecting`
 * (before the first answer), `reconnecting` (the stream dropped; retrying with backoff),
 * `error` (requests fail; retrying with backoff), `closed` (after close()).
 */
export type Connection = 'connecting' | 'live' | 'polling' | 'reconnecting' | 'error' | 'closed';
