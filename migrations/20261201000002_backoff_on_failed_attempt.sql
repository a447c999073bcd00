-- The retry backoff applies to every failed attempt, also when the job was already
-- `Failed` before it. The batch claim mode claims by row lock without changing the status,
-- so a retried `Failed` job that fails again goes from `Failed` to `Failed` with one more
-- attempt; the first version of this trigger (20261122000010) only fired on a change into
-- `Failed`, and such a job would have been due again at once.
DROP TRIGGER notifyd_failed_job_backoff ON apalis.jobs;

CREATE TRIGGER notifyd_failed_job_backoff
    BEFORE UPDATE OF status ON apalis.jobs
    FOR EACH ROW
    WHEN (NEW.status = 'Failed'
          AND (OLD.status IS DISTINCT FROM 'Failed' OR NEW.attempts > OLD.attempts)
          AND NEW.attempts < NEW.max_attempts
          AND NEW.job_type = 'notifyd.events')
    EXECUTE FUNCTION notify.delay_failed_job();
