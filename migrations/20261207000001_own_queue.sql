-- notifyd's own queue: rotating slot tables, truncated once drained, instead of apalis.jobs.
--
-- Why (measured, BENCHMARKS.md "A real database's bad day"):
-- * Under a held transaction (an open REPEATABLE READ snapshot, a backend request left in
--   a transaction), the rows of finished jobs cannot be vacuumed, and their index entries
--   cannot even be marked dead. Every claim walks all of them: with 100,000 finished jobs
--   behind one held snapshot, a claim of 100 jobs visited 1,871 buffers and took 11-18 ms,
--   growing with the hold. A table that is TRUNCATEd when drained throws its dead rows
--   away whatever the horizon, and TRUNCATE needs no vacuum (autovacuum may be off).
-- * The backend's INSERT paid for an apalis.jobs row: a ULID made in PL/pgSQL, a JSON
--   payload, eight indexes (six written per insert, two of them duplicates). A queue row
--   here is four fixed-width columns and one index.
--
-- The design (PgQue rotates its tables the same way):
-- * `notify.queue_0` .. `notify.queue_3` hold the due jobs; `notify.queue_slots` says which
--   one is `current` (receives new jobs), `draining` (still has jobs), `drained` (seen
--   empty; claims no longer touch it) or `clean` (truncated, ready to become current).
--   Workers rotate (src/claim/rotation.rs): every `slot_secs` the current slot becomes
--   draining and a clean one current; a drained slot is truncated as soon as no
--   transaction holds it (LOCK ... NOWAIT), and checked empty under that lock first.
-- * `notify.queue_later` holds jobs not due within `slot_secs` (a later `run_at`, a retry
--   after its backoff); the rotation moves them into the current slot when they come due,
--   so a far-future job never keeps a slot from being truncated.
-- * `notify.queue_dead` holds jobs that ended without an outcome (refused, or out of
--   attempts), for operators (`notifyd jobs failed`, `retry`, `discard`).
-- * `priority` is copied from `notify.event_types.priority` at enqueue; the claim takes the
--   current slot first, then the draining ones newest first, highest priority first in each.
--
-- Backends' SQL is unchanged: they insert into notify.events (or notify.new_events) as
-- before. apalis keeps running the workers (and apalis.workers their heartbeats);
-- apalis.jobs is no longer written. Jobs already in it are moved here below, and again by
-- every `notifyd migrate` (src/db.rs), for a worker of an older release still running.

ALTER TABLE notify.event_types
    ADD COLUMN priority smallint NOT NULL DEFAULT 0
        CONSTRAINT event_types_priority_range CHECK (priority BETWEEN -1000 AND 1000);
COMMENT ON COLUMN notify.event_types.priority IS
    'Claim order: higher first. Copied into each job at enqueue, so a change applies to new events.';
UPDATE notify.event_types SET priority = 100 WHERE name = 'new_message';
UPDATE notify.event_types SET priority = 50 WHERE name = 'status_change';

ALTER TABLE notify.queue_settings
    ADD COLUMN slot_secs integer NOT NULL DEFAULT 10
        CONSTRAINT queue_settings_slot_secs CHECK (slot_secs BETWEEN 1 AND 3600);
COMMENT ON COLUMN notify.queue_settings.slot_secs IS
    'How long a queue slot receives new jobs before the next one takes over.';

CREATE TABLE notify.queue_slots (
    slot       smallint PRIMARY KEY CONSTRAINT queue_slots_known CHECK (slot BETWEEN 0 AND 3),
    state      text NOT NULL
               CONSTRAINT queue_slots_state_known CHECK (state IN ('current', 'draining', 'drained', 'clean')),
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX queue_slots_one_current ON notify.queue_slots ((true)) WHERE state = 'current';
INSERT INTO notify.queue_slots (slot, state) VALUES (0, 'current'), (1, 'clean'), (2, 'clean'), (3, 'clean');

CREATE TABLE notify.queue_0 (
    event_id bigint NOT NULL,
    priority smallint NOT NULL DEFAULT 0,
    run_at   timestamptz NOT NULL,
    attempts smallint NOT NULL DEFAULT 0
);
CREATE INDEX queue_0_claim ON notify.queue_0 (priority DESC, run_at, event_id);
CREATE TABLE notify.queue_1 (LIKE notify.queue_0 INCLUDING ALL);
CREATE TABLE notify.queue_2 (LIKE notify.queue_0 INCLUDING ALL);
CREATE TABLE notify.queue_3 (LIKE notify.queue_0 INCLUDING ALL);

CREATE TABLE notify.queue_later (
    event_id   bigint PRIMARY KEY,
    priority   smallint NOT NULL DEFAULT 0,
    run_at     timestamptz NOT NULL,
    attempts   smallint NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX queue_later_due ON notify.queue_later (run_at);

CREATE TABLE notify.queue_dead (
    event_id  bigint PRIMARY KEY,
    attempts  smallint NOT NULL,
    reason    text NOT NULL,
    worker    text,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_dead_failed_at ON notify.queue_dead (failed_at);

-- Every waiting job, for operators and tests: where it waits (slot `0`-`3`, or `later`).
CREATE VIEW notify.queue AS
          SELECT '0' AS place, event_id, priority, run_at, attempts, NULL::text AS last_error FROM notify.queue_0
UNION ALL SELECT '1', event_id, priority, run_at, attempts, NULL FROM notify.queue_1
UNION ALL SELECT '2', event_id, priority, run_at, attempts, NULL FROM notify.queue_2
UNION ALL SELECT '3', event_id, priority, run_at, attempts, NULL FROM notify.queue_3
UNION ALL SELECT 'later', event_id, priority, run_at, attempts, last_error FROM notify.queue_later;

-- The type check moves from a foreign key to the enqueue trigger. Measured with pgbench
-- (4 clients, single-row INSERTs of one type): the foreign key's check locks the type's
-- row FOR KEY SHARE in every inserting transaction, so concurrent inserts of one type share
-- that lock through a MultiXact, written to disk and to the type's row each time; a plain
-- table with only that foreign key added ran at 0.74 x the same table without it. The
-- trigger below reads notify.event_types without locking and raises what the foreign key
-- raised: SQLSTATE 23503, constraint `events_event_type_known`, the same message. A type
-- cannot be deleted or renamed while events of it exist (`event_types_keep_used`, which
-- first takes a SHARE lock on notify.events, so an insert still in flight is waited for).
ALTER TABLE notify.events DROP CONSTRAINT events_event_type_known;

CREATE FUNCTION notify.keep_used_event_type() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.name = OLD.name THEN
        RETURN NEW;
    END IF;
    LOCK TABLE notify.events IN SHARE MODE;
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM notify.events) THEN
            RAISE EXCEPTION 'cannot truncate a table referenced in a foreign key constraint'
                USING ERRCODE = 'feature_not_supported',
                      CONSTRAINT = 'events_event_type_known',
                      DETAIL = 'Table "events" references "event_types" (events_event_type_known).';
        END IF;
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM notify.events AS e WHERE e.event_type = OLD.name) THEN
        RAISE EXCEPTION 'update or delete on table "event_types" violates foreign key constraint "events_event_type_known" on table "events"'
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'events_event_type_known',
                  SCHEMA = 'notify', TABLE = 'event_types',
                  DETAIL = format('Key (name)=(%s) is still referenced from table "events".', OLD.name);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;

CREATE TRIGGER event_types_keep_used
    BEFORE DELETE OR UPDATE OF name ON notify.event_types
    FOR EACH ROW EXECUTE FUNCTION notify.keep_used_event_type();
CREATE TRIGGER event_types_keep_used_truncate
    BEFORE TRUNCATE ON notify.event_types
    FOR EACH STATEMENT EXECUTE FUNCTION notify.keep_used_event_type();

-- The enqueue: one statement per INSERT statement into the current slot (due within
-- slot_secs) and, only when some row is due later, one into queue_later. Static SQL per
-- slot, so every branch keeps its cached plan. SECURITY DEFINER as before (migration
-- 20261206000001): the backend needs no right on the queue.
CREATE OR REPLACE FUNCTION notify.enqueue_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s       smallint;
    horizon timestamptz;
    unknown text;
BEGIN
    SELECT n.event_type INTO unknown FROM new_events AS n
    WHERE NOT EXISTS (SELECT 1 FROM notify.event_types AS t WHERE t.name = n.event_type)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "events" violates foreign key constraint "events_event_type_known"'
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'events_event_type_known',
                  SCHEMA = 'notify', TABLE = 'events', COLUMN = 'event_type',
                  DETAIL = format('Key (event_type)=(%s) is not present in table "event_types".', unknown);
    END IF;
    SELECT q.slot, now() + make_interval(secs => st.slot_secs)
    INTO s, horizon
    FROM notify.queue_slots AS q, notify.queue_settings AS st
    WHERE q.state = 'current';
    IF s = 0 THEN
        INSERT INTO notify.queue_0 (event_id, priority, run_at)
        SELECT n.id, t.priority, n.run_at FROM new_events AS n
        JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 1 THEN
        INSERT INTO notify.queue_1 (event_id, priority, run_at)
        SELECT n.id, t.priority, n.run_at FROM new_events AS n
        JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 2 THEN
        INSERT INTO notify.queue_2 (event_id, priority, run_at)
        SELECT n.id, t.priority, n.run_at FROM new_events AS n
        JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 3 THEN
        INSERT INTO notify.queue_3 (event_id, priority, run_at)
        SELECT n.id, t.priority, n.run_at FROM new_events AS n
        JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSE
        -- No current slot (someone edited notify.queue_slots): never lose the job.
        horizon := '-infinity';
    END IF;
    IF EXISTS (SELECT 1 FROM new_events AS n WHERE n.run_at > horizon) THEN
        INSERT INTO notify.queue_later (event_id, priority, run_at)
        SELECT n.id, t.priority, n.run_at FROM new_events AS n
        JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at > horizon
        ON CONFLICT (event_id) DO NOTHING;
    END IF;
    RETURN NULL;
END;
$$;

-- The claim: up to `n` due jobs of at least `min_priority`, locked FOR UPDATE SKIP LOCKED
-- and deleted in the caller's transaction (a rollback gives them back, at the same ctid),
-- from the current slot first, then the draining ones, newest first; highest priority,
-- then oldest run_at, then event id, in each. Deleting them here, not after processing,
-- spares every batch a second visit of its rows (the batch's own DELETE by ctid). A
-- worker's express lane claims with a `min_priority` above the bulk types', so interactive
-- jobs never wait behind a broadcast. It touches no drained or clean slot, so those can be
-- truncated while claims run.
--
-- The hint (`after_*`: the last job, in claim order, of the caller's previous claim in
-- `after_slot`): in that slot the claim first takes the higher priorities, then the jobs
-- after the hint, and only then, if that left it short, the jobs before it. The jobs
-- before the hint are mostly the caller's own batches still in flight (locked) and
-- finished ones (dead until the horizon passes), which every claim from the top walked
-- again: measured, 17 % of the database's time in a drain went to the claim. A job
-- before the hint (a batch rolled back) is taken once the rest is short, or by a claim
-- without a hint (the worker sends none at least once a second).
--
-- The plan is fixed whatever the statistics say (a just-truncated slot has none): the
-- settings below leave the claim index as the only way (each slot's statement is planned
-- per call, a few dozen microseconds). `jit = off`, because a plan with a disabled node
-- costs 10^10 and would be JIT-compiled on every call (20 ms, measured, for a claim that
-- finds nothing).
CREATE FUNCTION notify.claim_jobs(n integer, min_priority integer DEFAULT -32768,
                                  after_slot smallint DEFAULT NULL,
                                  after_priority smallint DEFAULT NULL,
                                  after_run_at timestamptz DEFAULT NULL,
                                  after_event bigint DEFAULT NULL)
RETURNS TABLE (slot smallint, tid text, event_id bigint, run_at timestamptz, attempts smallint,
               priority smallint)
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET jit = off SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s     smallint;
    got   integer := 0;
    k     integer;
    part  text;
    parts text[];
BEGIN
    FOR s IN SELECT q.slot FROM notify.queue_slots AS q
             WHERE q.state IN ('current', 'draining')
             ORDER BY q.state = 'current' DESC, q.changed_at DESC
    LOOP
        IF s = after_slot AND after_priority IS NOT NULL AND after_run_at IS NOT NULL
           AND after_event IS NOT NULL THEN
            parts := ARRAY['q.priority > $3',
                           'q.priority = $3 AND (q.run_at, q.event_id) > ($4, $5)',
                           'q.priority < $3',
                           'true'];
        ELSE
            parts := ARRAY['true'];
        END IF;
        FOREACH part IN ARRAY parts LOOP
            RETURN QUERY EXECUTE format(
                'WITH c AS (
                     DELETE FROM notify.queue_%1$s AS j WHERE j.ctid = ANY(ARRAY(
                         SELECT q.ctid FROM notify.queue_%1$s AS q
                         WHERE q.run_at <= now() AND q.priority >= $2 AND %2$s
                         ORDER BY q.priority DESC, q.run_at, q.event_id LIMIT $1
                         FOR UPDATE SKIP LOCKED))
                     RETURNING j.ctid, j.event_id, j.run_at, j.attempts, j.priority)
                 SELECT %1$s::smallint, c.ctid::text, c.event_id, c.run_at, c.attempts, c.priority
                 FROM c', s, part)
                USING n - got, min_priority, after_priority, after_run_at, after_event;
            GET DIAGNOSTICS k = ROW_COUNT;
            got := got + k;
            EXIT WHEN got >= n;
        END LOOP;
        EXIT WHEN got >= n;
    END LOOP;
END;
$$;

-- Move the jobs of apalis.jobs (this queue's) here: unfinished ones to queue_later with
-- their run_at (the rotation moves them into the current slot as they come due), ended
-- ones to queue_dead; jobs whose event no longer exists (retention deleted it) have
-- nothing left to do and are dropped. Idempotent; `notifyd migrate` calls it every time,
-- for jobs written by a worker of an older release.
CREATE FUNCTION notify.adopt_apalis_jobs() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    moved bigint;
BEGIN
    WITH gone AS (
        DELETE FROM apalis.jobs AS j
        WHERE j.job_type = 'notifyd.events' AND j.idempotency_key ~ '^event:[0-9]{1,18}$'
        RETURNING substr(j.idempotency_key, 7)::bigint AS event_id, j.status, j.attempts,
                  j.max_attempts, j.run_at, j.last_result, j.lock_by, j.done_at
    ),
    known AS (
        SELECT g.*, COALESCE(t.priority, 0) AS priority,
               (g.status = 'Killed' OR (g.status = 'Failed' AND g.attempts >= g.max_attempts)) AS ended
        FROM gone AS g
        JOIN notify.events AS e ON e.id = g.event_id
        LEFT JOIN notify.event_types AS t ON t.name = e.event_type
        WHERE g.status <> 'Done'
    ),
    dead AS (
        INSERT INTO notify.queue_dead (event_id, attempts, reason, worker, failed_at)
        SELECT k.event_id, least(k.attempts, 32767), COALESCE(k.last_result ->> 'Err', k.last_result::text, k.status),
               k.lock_by, COALESCE(k.done_at, now())
        FROM known AS k WHERE k.ended
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    ),
    later AS (
        INSERT INTO notify.queue_later (event_id, priority, run_at, attempts, last_error)
        SELECT k.event_id, k.priority, k.run_at, least(k.attempts, 32767), k.last_result ->> 'Err'
        FROM known AS k WHERE NOT k.ended
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM dead) + (SELECT count(*) FROM later) INTO moved;
    RETURN moved;
END;
$$;

SELECT notify.adopt_apalis_jobs();

-- The old enqueue path's helpers on apalis.jobs go; the table itself is apalis's.
DROP TRIGGER IF EXISTS notifyd_failed_job_backoff ON apalis.jobs;
