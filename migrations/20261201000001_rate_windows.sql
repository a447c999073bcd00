-- Rate-limit state per user: the stamps of the user's newest notifications, so that the
-- store step checks the limit with one row per user instead of reading the user's newest
-- `limit` notifications (one heap fetch each) for every event.
--
-- One entry per store transaction that stored for the user: `stamps[i]` is that
-- transaction's stamp (every notification it wrote has `created_at = stamps[i]`) and
-- `counts[i]` how many it wrote. Newest first. The store keeps the entries of the last 7
-- days (the longest window the worker accepts, so that a longer window configured later
-- still sees them), and at most `limit` entries (each stands for at least one
-- notification, so older entries cannot change a decision). It is written under the user's advisory lock,
-- in the transaction that inserts the notifications, so it is exactly the stamps of the
-- notifications delivered: the limit counts deliveries, and a notification deleted later
-- (retention) still counted while it was in the window.
CREATE TABLE notify.rate_windows (
    user_id text PRIMARY KEY,
    stamps  timestamptz[] NOT NULL,
    counts  integer[] NOT NULL,
    CONSTRAINT rate_windows_same_length CHECK (cardinality(stamps) = cardinality(counts))
) WITH (fillfactor = 70);  -- room for the HOT update that every store transaction makes

-- Backfill from the notifications already delivered in the longest window the worker
-- accepts (7 days), so that limits stay exact across the upgrade. Workers of the previous
-- release do not write this table: stop them before starting this release's workers (see
-- migrations/README.md).
INSERT INTO notify.rate_windows (user_id, stamps, counts)
SELECT user_id,
       array_agg(created_at ORDER BY created_at DESC),
       array_agg(n ORDER BY created_at DESC)
FROM (SELECT user_id, created_at, count(*)::integer AS n
      FROM notify.notifications
      WHERE created_at > now() - interval '7 days'
      GROUP BY user_id, created_at) AS per_stamp
GROUP BY user_id;
