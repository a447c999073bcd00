-- A stored event's outcome is its notification: the worker no longer writes `outcome`,
-- `processed_at` on the `notify.events` row of an event it stored. It still writes them
-- for every other outcome (`opted_out`, `rate_limited`, `invalid`), which are the few.
--
-- Why: the event row is the widest row the worker touches (the body and link as the
-- backend wrote them), and recording `stored` on it was one more row version, WAL record
-- and index check per delivered event, in the statement that takes 85 % of a batch. The
-- notification row the same statement inserts already says "stored", exactly once per
-- event (`notifications_one_per_event`). Measured in BENCHMARKS.md ("The outcome of a stored
-- event").
--
-- Readers: `notify.event_outcomes` gives every event's outcome, `stored` included, and
-- its notification's id. `notify.events.outcome` is NULL for a stored event from this
-- release on; rows recorded before keep their `stored`. The view reads both.
--
-- A notification deleted while its event row still exists (the backend deleting one, or
-- retention reaching a notification before its event) writes `stored` on the event row
-- first, in the deleting statement (trigger below), so the event keeps its outcome and a
-- second run of its job still finds it processed. Retention deletes events before their
-- notifications, so the trigger then finds nothing to write. `TRUNCATE
-- notify.notifications` does not fire it: events it empties lose their `stored`.
--
-- Compatible both ways: workers of the previous release still write `stored` on the
-- event row, which the view and this release's workers read as before; they check for
-- an earlier run with `outcome IS NULL` only, so a second run of a job that this release
-- stored re-inserts nothing (`ON CONFLICT (event_id) DO NOTHING`) and writes `stored` on
-- the event row; it may count that duplicate against the user's limit within its batch
-- (an event rate-limited that a newer worker would have stored; never one too many). The
-- rate limit stays exact in both directions (it counts inserted rows).
--
-- For readers this changes the documented meaning of `notify.events.outcome` (NULL no
-- longer means "not processed"): jobs/README.md, Outcomes, says so for backends.

CREATE VIEW notify.event_outcomes AS
SELECT e.id AS event_id,
       e.user_id,
       e.event_type,
       e.idempotency_key,
       e.created_at,
       e.run_at,
       COALESCE(e.outcome, CASE WHEN n.id IS NOT NULL THEN 'stored' END) AS outcome,
       e.outcome_reason,
       COALESCE(e.processed_at, n.created_at) AS processed_at,
       n.id AS notification_id
FROM notify.events AS e
LEFT JOIN notify.notifications AS n ON n.event_id = e.id;

COMMENT ON VIEW notify.event_outcomes IS
    'Every event with its outcome (NULL: not processed yet); stored events with their notification id';

CREATE FUNCTION notify.notifications_keep_outcome() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE notify.events AS e
    SET outcome = 'stored', processed_at = g.created_at
    FROM old_rows AS g
    WHERE e.id = g.event_id AND e.outcome IS NULL;
    RETURN NULL;
END;
$$;

CREATE TRIGGER notifications_keep_outcome
    AFTER DELETE ON notify.notifications
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.notifications_keep_outcome();
