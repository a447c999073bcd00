-- Retry policy for queue jobs: a configurable attempt limit, and exponential backoff with
-- jitter between apalis-level attempts.
--
-- Expand-only (see migrations/README.md): a new table, a new trigger, and a new body for
-- notify.enqueue_events() that keeps its signature and behaviour (the limit stays 5 until an
-- operator changes it). Workers of the previous version run unchanged against it.
--
-- * notify.queue_settings (one row) holds the policy. Operators change it with
--   `notifyd jobs settings ...` or plain SQL; it applies to events enqueued (max_attempts)
--   and failures recorded (backoff) from then on, without a restart.
-- * max_attempts is stamped on each job when its event is enqueued.
-- * apalis retries a `Failed` job as soon as it is due, with no backoff. The trigger below
--   pushes the job's run_at into the future when apalis records a retryable failure
--   (status becomes 'Failed' with attempts < max_attempts), in the same UPDATE:
--   delay = min(retry_max, retry_base * 2^(attempts - 1)) * (0.5 .. 1.5).
--   Exhausted jobs ('Failed' with attempts >= max_attempts) and refused jobs ('Killed') are
--   left alone: they are final, kept with their reason for `notifyd jobs failed`.

CREATE TABLE notify.queue_settings (
    singleton       boolean PRIMARY KEY DEFAULT true CONSTRAINT queue_settings_one_row CHECK (singleton),
    max_attempts    integer NOT NULL DEFAULT 5
                    CONSTRAINT queue_settings_max_attempts CHECK (max_attempts BETWEEN 1 AND 100),
    retry_base_secs double precision NOT NULL DEFAULT 1
                    CONSTRAINT queue_settings_retry_base CHECK (retry_base_secs > 0 AND retry_base_secs <= 3600),
    retry_max_secs  double precision NOT NULL DEFAULT 300
                    CONSTRAINT queue_settings_retry_max CHECK (retry_max_secs <= 86400),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_settings_retry_order CHECK (retry_max_secs >= retry_base_secs)
);

INSERT INTO notify.queue_settings DEFAULT VALUES;

-- Same contract as before (one job per event row, same transaction, set-based); only the
-- attempt limit now comes from the settings row (5 if the row is missing).
CREATE OR REPLACE FUNCTION notify.enqueue_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    limit_attempts integer;
BEGIN
    SELECT s.max_attempts INTO limit_attempts FROM notify.queue_settings AS s;
    INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, idempotency_key)
    SELECT convert_to('{"event_id":' || n.id || '}', 'UTF8'),
           apalis.generate_ulid(),
           'notifyd.events',
           'Pending',
           0,
           COALESCE(limit_attempts, 5),
           n.run_at,
           0,
           'event:' || n.id
    FROM new_events AS n
    ORDER BY n.id;
    RETURN NULL;
END;
$$;

CREATE FUNCTION notify.delay_failed_job() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    base  double precision;
    cap   double precision;
    delay double precision;
BEGIN
    SELECT s.retry_base_secs, s.retry_max_secs INTO base, cap FROM notify.queue_settings AS s;
    base := COALESCE(base, 1);
    cap := COALESCE(cap, 300);
    delay := least(cap, base * power(2, least(greatest(NEW.attempts, 1) - 1, 30)))
             * (0.5 + random());
    NEW.run_at := now() + make_interval(secs => delay);
    RETURN NEW;
END;
$$;

-- The WHEN clause is evaluated without calling the function, so the hot path (acks that set
-- 'Done', claims that set 'Queued') pays next to nothing.
CREATE TRIGGER notifyd_failed_job_backoff
    BEFORE UPDATE OF status ON apalis.jobs
    FOR EACH ROW
    WHEN (NEW.status = 'Failed'
          AND OLD.status IS DISTINCT FROM 'Failed'
          AND NEW.attempts < NEW.max_attempts
          AND NEW.job_type = 'notifyd.events')
    EXECUTE FUNCTION notify.delay_failed_job();
