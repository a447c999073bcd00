-- Bridge from the enqueue contract (notify.events) to the apalis queue (apalis.jobs).
--
-- Runs after apalis's own migrations (see src/db.rs). The backend never writes
-- apalis.jobs itself: every committed event row gets exactly one job, created in the
-- same transaction, so an event is enqueued if and only if the backend's transaction
-- commits. The job payload is only `{"event_id": N}`; the event row stays the source
-- of truth, guarded by the constraints above.

CREATE FUNCTION notify.enqueue_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, idempotency_key)
    SELECT convert_to('{"event_id":' || n.id || '}', 'UTF8'),
           apalis.generate_ulid(),
           'notifyd.events',
           'Pending',
           0,
           5,
           n.run_at,
           0,
           'event:' || n.id
    FROM new_events AS n
    ORDER BY n.id;
    RETURN NULL;
END;
$$;

-- One statement-level trigger per INSERT statement: a 10,000-row INSERT ... SELECT
-- enqueues its jobs with one set-based INSERT.
CREATE TRIGGER events_enqueue
    AFTER INSERT ON notify.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.enqueue_events();

-- apalis's worker exits when a claimed row's id is not a ULID (TaskIdError), and it
-- exits again on every restart. Make such a row impossible to write.
ALTER TABLE apalis.jobs
    ADD CONSTRAINT notifyd_job_id_is_ulid CHECK (id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$');

-- apalis never deletes finished rows. The worker's cleanup loop deletes `Done` rows every
-- few seconds and failed ones after the retention window; these partial indexes let it
-- find them without scanning the pending backlog.
CREATE INDEX notifyd_jobs_done ON apalis.jobs (job_type) WHERE status = 'Done';
CREATE INDEX notifyd_jobs_dead ON apalis.jobs (job_type, done_at)
    WHERE status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts);
