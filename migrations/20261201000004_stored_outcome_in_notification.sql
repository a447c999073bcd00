-- A stored event's outcome is its notification: the worker no longer writes `outcome`,
-- `processed_at` on the `notify.events` row of an event it stored. It still writes them
-- for every other outcome (`opted_out`, `rate_limited`, `invalid`), which are the few.
--
-- Why: the event row is the widest row the worker touches (the body and link as the
-- backend wrote them), and recording `stored` on it was one more row version, WAL record
-- and index check per delivered event, in the statement that takes three quarters of a
-- batch's time. The notification row the same statement inserts already says "stored",
-- exactly once per event (`notifications_one_per_event`). Measured in BENCHMARKS.md ("The
-- outcome of a stored event").
--
-- Readers: `notify.event_outcomes` gives every event's outcome, `stored` included, and
-- its notification's id. `notify.events.outcome` is NULL for a stored event from this
-- release on; rows recorded before keep their `stored`. The view reads both.
--
-- A notification deleted while its event row still exists (the backend deleting one, or
-- retention reaching a notification before its event) writes `stored` on the event row in
-- the deleting statement (the AFTER DELETE trigger below), so the event keeps its outcome
-- and a second run of its job still finds it decided. Retention deletes events before their
-- notifications, so the trigger then finds nothing to write. The trigger skips event rows
-- that another transaction holds locked (one deleting them, or deleting a user's events
-- and then their notifications), so it adds no lock wait and no deadlock to a delete (if
-- that other transaction then rolls back, its event keeps no `stored`).
-- It runs as the owner (SECURITY DEFINER), so a role that may delete notifications needs
-- no UPDATE right on `notify.events`. `TRUNCATE notify.notifications` does not fire it:
-- the events it empties lose their `stored` (docs/OPERATIONS.md says to DELETE instead).
--
-- Workers of the previous release side by side with this one: both keep one notification
-- per event and the exact limit (both count inserted rows). An older worker running a
-- second time an event that this release stored sees no outcome on the row, inserts
-- nothing (`ON CONFLICT (event_id) DO NOTHING`) and writes the outcome it decided on the
-- row, which may be `rate_limited` or `opted_out` (and it may rank that event within its
-- batch, so one other event of the user may be rate-limited that need not be; never one
-- delivered too many). The view therefore reads `stored` whenever a notification exists,
-- whatever the row says. Older binaries' `notifyd status` and cleanup read the row only:
-- until they are replaced they count stored events as unprocessed and keep them up to
-- twice the retention.
--
-- For readers this is a contract change: `notify.events.outcome` is NULL for a stored
-- event, so NULL no longer means "not processed". jobs/README.md (Outcomes) announces it
-- to backends, which read `notify.event_outcomes` instead.

CREATE VIEW notify.event_outcomes AS
SELECT e.id AS event_id,
       e.user_id,
       e.event_type,
       e.idempotency_key,
       e.created_at,
       e.run_at,
       CASE WHEN n.id IS NOT NULL THEN 'stored' ELSE e.outcome END AS outcome,
       CASE WHEN n.id IS NULL THEN e.outcome_reason END AS outcome_reason,
       CASE WHEN n.id IS NOT NULL THEN n.created_at ELSE e.processed_at END AS processed_at,
       n.id AS notification_id
FROM notify.events AS e
-- One index probe per event row read (LIMIT keeps the planner from turning it into a join
-- that hashes every notification); event_id is unique, so it changes no result.
LEFT JOIN LATERAL (
    SELECT n.id, n.created_at
    FROM notify.notifications AS n
    WHERE n.event_id = e.id
    LIMIT 1
) AS n ON true;

COMMENT ON VIEW notify.event_outcomes IS
    'Every event with its outcome (NULL: not processed yet); stored events with their notification id';

CREATE FUNCTION notify.notifications_keep_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- By key (`= ANY(ARRAY(...))`): the plan is cached per session, and a join with the
    -- transition table costed on a first bulk delete could scan every event later on.
    UPDATE notify.events AS e
    SET outcome = 'stored', outcome_reason = NULL, processed_at = g.created_at
    FROM old_rows AS g
    WHERE e.id = g.event_id
      AND e.id = ANY(ARRAY(
          SELECT x.id FROM notify.events AS x
          WHERE x.id = ANY(ARRAY(SELECT event_id FROM old_rows))
            AND x.outcome IS DISTINCT FROM 'stored'
          FOR UPDATE SKIP LOCKED));
    RETURN NULL;
END;
$$;

CREATE TRIGGER notifications_keep_outcome
    AFTER DELETE ON notify.notifications
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.notifications_keep_outcome();
