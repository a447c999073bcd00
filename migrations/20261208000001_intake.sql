-- The intake: the event row is the job, and workers take committed events into the queue
-- (issue 16, a cheaper enqueue; the design is docs/INTAKE.md).
--
-- Why (measured, BENCHMARKS.md "The backend's INSERT"): the enqueue trigger writes a second
-- row in the backend's transaction, and PL/pgSQL pays per statement it runs (a snapshot,
-- the plan's locks, executor start and end); no variant of it brought the backend's
-- single-row INSERT above 0.65 x a plain table's. Without it the INSERT writes the event
-- row alone.
--
-- What this migration adds (expand only: nothing changes until an operator switches):
-- * `notify.events.txid`: the inserting transaction's id (`pg_current_xact_id()`, the
--   top-level one inside a savepoint too), notifyd's own column; backends never write it.
--   Nullable, so old rows need no rewrite; its index comes in the next migration
--   (`CREATE INDEX CONCURRENTLY`).
-- * `notify.intake`: which path feeds the queue, `trigger` (the enqueue trigger, as
--   before) or `intake` (the trigger disabled; workers call `notify.take_in()`).
-- * `notify.intake_steps`: an append-only log of the intake's position. Appended, not
--   updated: under a held snapshot every update of one row leaves a version that each
--   reader walks again (a HOT chain); the newest row is read from the right end of the
--   primary key, where the dead ones never are.
-- * `notify.event_type_is_known(text)`: the type check moves from the trigger to the row's
--   check constraint (below), so that it holds in both modes. It
--   raises what the trigger raised (SQLSTATE 23503, constraint `events_event_type_known`,
--   the same message and detail). The known names are written into the function's body,
--   and a trigger on `notify.event_types` writes it again when a name is added, renamed or
--   removed: a lookup of the table per row would cost an SPI call per row (measured: 6 %
--   of the single-row INSERT, and seconds for a broadcast of a million rows).
--
-- The switch, `notify.enqueue_by('intake' | 'trigger')` (`notifyd queue enqueue-by`),
-- runs as the owner and is one transaction: it takes `notify.events` in SHARE ROW EXCLUSIVE
-- mode (every INSERT in flight has committed, new ones wait), then either disables the
-- trigger and records, in a later statement, the snapshot up to which the trigger queued
-- everything; or takes in every committed event not yet taken in and enables the trigger.
-- A worker of a release before this one never takes in: switch to `intake` only once every
-- worker runs this release, and back to `trigger` before rolling back to an older one.

SET LOCAL lock_timeout = '1s';

ALTER TABLE notify.events ADD COLUMN txid xid8;
ALTER TABLE notify.events ALTER COLUMN txid SET DEFAULT pg_catalog.pg_current_xact_id();
COMMENT ON COLUMN notify.events.txid IS
    'The inserting transaction (notifyd''s own; never written by backends): the intake takes events in by it.';

-- The type check, as a function written from notify.event_types.
CREATE FUNCTION notify.write_event_type_check() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    names text[];
BEGIN
    -- The names are read with this statement's snapshot: at READ COMMITTED it is taken
    -- after the caller's lock, so it sees every change committed before.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'notify.event_types is changed at READ COMMITTED only, not %',
                        upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'The type check is written from the table''s names, which an older snapshot would miss.';
    END IF;
    SELECT COALESCE(array_agg(t.name ORDER BY t.name), '{}') INTO names FROM notify.event_types AS t;
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION notify.event_type_is_known(v text) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $b$
BEGIN
    IF v OPERATOR(pg_catalog.=) ANY (%L::pg_catalog.text[]) THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION 'insert or update on table "events" violates foreign key constraint "events_event_type_known"'
        USING ERRCODE = 'foreign_key_violation',
              CONSTRAINT = 'events_event_type_known',
              SCHEMA = 'notify', TABLE = 'events', COLUMN = 'event_type',
              DETAIL = pg_catalog.format('Key (event_type)=(%%s) is not present in table "event_types".', v);
END;
$b$
$f$, names);
    COMMENT ON FUNCTION notify.event_type_is_known(text) IS
        'The events_event_type_known check; its body is written by notify.write_event_type_check() from notify.event_types.';
END;
$$;

SELECT notify.write_event_type_check();
REVOKE EXECUTE ON FUNCTION notify.write_event_type_check() FROM PUBLIC;

CREATE FUNCTION notify.event_types_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- One writer at a time: two concurrent CREATE OR REPLACE of one function fail with
    -- "tuple concurrently updated". The second waits here until the first commits, and its
    -- next statement reads the first one's names. An advisory lock, not the table's: two
    -- writers each holding the table's ROW EXCLUSIVE would deadlock on SHARE ROW EXCLUSIVE.
    PERFORM pg_advisory_xact_lock(7957707062626549763);
    PERFORM notify.write_event_type_check();
    RETURN NULL;
END;
$$;

CREATE TRIGGER event_types_write_check
    AFTER INSERT OR DELETE OR UPDATE OF name OR TRUNCATE ON notify.event_types
    FOR EACH STATEMENT EXECUTE FUNCTION notify.event_types_changed();

-- The checks of an event row, as one check constraint (`events_row_valid`) calling one
-- function. PostgreSQL reads each check's expression back and prepares it at the start of
-- every INSERT statement, so each constraint costs the single-row INSERT a few percent
-- whatever it checks (measured: the seven checks folded into one, 0.74 -> 0.79 x a plain
-- table; the three text checks as SQL functions, inlined into the fold's cached plan,
-- 0.79 -> 0.81 x). What a backend sees does not change: each refusal still names its own
-- constraint (`events_body_length`, `events_event_type_known`, ...), with the same SQLSTATE
-- and message, and a row that breaks two rules is refused for the same one as before
-- (PostgreSQL checks constraints in name order; the function tests them in that order).
-- Only the catalog changes: `\d notify.events` lists `events_row_valid`.
CREATE OR REPLACE FUNCTION notify.event_user_id_is_valid(v text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.char_length(v) OPERATOR(pg_catalog.>=) 1
       AND pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 128
       AND v OPERATOR(pg_catalog.!~)
           E'[[:cntrl:]\\s\\u00a0\\u1680\\u2000-\\u200b\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]'
$$;
CREATE OR REPLACE FUNCTION notify.event_body_is_valid(v text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.char_length(v) OPERATOR(pg_catalog.>=) 1
       AND pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 1000
       AND v OPERATOR(pg_catalog.~)
           E'[^\\s\\u00a0\\u1680\\u2000-\\u200b\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]'
$$;
CREATE OR REPLACE FUNCTION notify.event_link_is_safe(v text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 2048
       AND v OPERATOR(pg_catalog.!~)
           E'[[:cntrl:]\\s\\u00a0\\u2000-\\u200b\\u2028\\u2029\\u3000\\\\''"`<>]'
       AND (v OPERATOR(pg_catalog.~) '^/([^/]|$)'
            OR v OPERATOR(pg_catalog.~*)
               ('^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?'
                '(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?'
                '([/?#]|$)'))
$$;

CREATE FUNCTION notify.event_row_is_valid(u text, t text, b text, l text, k text, o text)
RETURNS boolean LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    refused pg_catalog.text;
BEGIN
    -- In the order PostgreSQL checked the constraints (by name, the type's last), so that
    -- a row breaking two rules is refused for the same one as before.
    IF NOT notify.event_body_is_valid(b) THEN
        refused := 'events_body_length';
    ELSIF t OPERATOR(pg_catalog.=) 'digest' THEN
        refused := 'events_event_type_not_digest';
    ELSIF NOT (pg_catalog.char_length(k) OPERATOR(pg_catalog.>=) 1
               AND pg_catalog.char_length(k) OPERATOR(pg_catalog.<=) 255) THEN
        refused := 'events_idempotency_key_length';
    ELSIF NOT (l IS NULL OR notify.event_link_is_safe(l)) THEN
        refused := 'events_link_safe';
    ELSIF NOT (o OPERATOR(pg_catalog.=) ANY ('{stored,opted_out,rate_limited,invalid}'::pg_catalog.text[])) THEN
        refused := 'events_outcome_known';
    ELSIF NOT notify.event_user_id_is_valid(u) THEN
        refused := 'events_user_id_valid';
    ELSE
        -- Last, as the trigger (and the foreign key before it) checked it after every
        -- check: it raises the foreign key's error itself.
        RETURN notify.event_type_is_known(t);
    END IF;
    RAISE EXCEPTION 'new row for relation "events" violates check constraint "%"', refused
        USING ERRCODE = 'check_violation', CONSTRAINT = refused, SCHEMA = 'notify', TABLE = 'events';
END;
$$;
ALTER TABLE notify.events
    DROP CONSTRAINT events_body_length,
    DROP CONSTRAINT events_event_type_not_digest, DROP CONSTRAINT events_idempotency_key_length,
    DROP CONSTRAINT events_link_safe, DROP CONSTRAINT events_outcome_known,
    DROP CONSTRAINT events_user_id_valid,
    ADD CONSTRAINT events_row_valid
        CHECK (notify.event_row_is_valid(user_id, event_type, body, link, idempotency_key, outcome)) NOT VALID;
COMMENT ON FUNCTION notify.event_row_is_valid(text, text, text, text, text, text) IS
    'The events_row_valid check: raises the error of the first rule (by constraint name) the row breaks.';


-- The enqueue trigger without its type check (the check constraint above runs first).
CREATE OR REPLACE FUNCTION notify.enqueue_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s       smallint;
    horizon timestamptz;
BEGIN
    SELECT q.slot, now() + make_interval(secs => st.slot_secs)
    INTO s, horizon
    FROM notify.queue_slots AS q, notify.queue_settings AS st
    WHERE q.state = 'current';
    IF s = 0 THEN
        INSERT INTO notify.queue_0 (event_id, priority, run_at)
        SELECT n.id, COALESCE(t.priority, 0), n.run_at FROM new_events AS n
        LEFT JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 1 THEN
        INSERT INTO notify.queue_1 (event_id, priority, run_at)
        SELECT n.id, COALESCE(t.priority, 0), n.run_at FROM new_events AS n
        LEFT JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 2 THEN
        INSERT INTO notify.queue_2 (event_id, priority, run_at)
        SELECT n.id, COALESCE(t.priority, 0), n.run_at FROM new_events AS n
        LEFT JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSIF s = 3 THEN
        INSERT INTO notify.queue_3 (event_id, priority, run_at)
        SELECT n.id, COALESCE(t.priority, 0), n.run_at FROM new_events AS n
        LEFT JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at <= horizon;
    ELSE
        -- No current slot (someone edited notify.queue_slots): never lose the job.
        horizon := '-infinity';
    END IF;
    IF EXISTS (SELECT 1 FROM new_events AS n WHERE n.run_at > horizon) THEN
        INSERT INTO notify.queue_later (event_id, priority, run_at)
        SELECT n.id, COALESCE(t.priority, 0), n.run_at FROM new_events AS n
        LEFT JOIN notify.event_types AS t ON t.name = n.event_type WHERE n.run_at > horizon
        ON CONFLICT (event_id) DO NOTHING;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TABLE notify.intake (
    only_row    boolean PRIMARY KEY DEFAULT true CONSTRAINT intake_one_row CHECK (only_row),
    mode        text NOT NULL CONSTRAINT intake_mode_known CHECK (mode IN ('trigger', 'intake')),
    switched_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO notify.intake (mode) VALUES ('trigger');
COMMENT ON TABLE notify.intake IS
    'Which path feeds the queue: the enqueue trigger, or the workers'' intake. Change it with notify.enqueue_by() only.';

CREATE TABLE notify.intake_steps (
    step      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Every event whose transaction is visible in this snapshot has been taken in (or
    -- queued by the trigger), except the rest of the big transactions below.
    taken_to  pg_snapshot NOT NULL,
    -- A step under way: taking in what is visible here and not in taken_to, in (txid, id)
    -- order; pos_* is the last row taken.
    target    pg_snapshot,
    pos_txid  xid8,
    pos_id    bigint,
    -- Transactions with many rows, taken in `chunk` rows per call after the small ones,
    -- so that a broadcast of a million rows never holds back the events committed after it:
    -- big_after[i] is the last id of big_txids[i] taken in.
    big_txids xid8[] NOT NULL DEFAULT '{}',
    big_after bigint[] NOT NULL DEFAULT '{}',
    taken     integer NOT NULL DEFAULT 0,
    at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE notify.intake_steps IS
    'The intake''s position, appended by each step that moved it; the newest row is the position.';

-- The advisory lock of the intake: 0x6e6f746966790002 (the rotation's is ...0001).

-- One call's work; the caller holds the intake lock, at READ COMMITTED, and took it in an
-- earlier statement, so that every snapshot read here is taken after it.
CREATE FUNCTION notify.take_in_step(max_rows integer, chunk integer,
                                    OUT taken integer, OUT more boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off AS $$
DECLARE
    st        notify.intake_steps;
    prev      pg_snapshot;
    tgt       pg_snapshot;
    pt        xid8;
    pi        bigint;
    bigs      xid8[];
    afters    bigint[];
    keep_t    xid8[] := '{}';
    keep_a    bigint[] := '{}';
    los       bigint[] := '{}';
    his       bigint[] := '{}';
    lo        bigint;
    x         bigint;
    s         smallint;
    horizon   timestamptz;
    budget    integer;
    got       integer;
    last_t    xid8;
    last_i    bigint;
    last_n    integer;
    walked    boolean := true;
    fresh     boolean := false;
    fresh_t   xid8;
    fresh_a   bigint;
    i         integer;
    new_step  bigint;
    copy_sql  text;
    big_last  bigint;
BEGIN
    taken := 0;
    more := false;
    IF current_setting('notifyd.intake_locked', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'notify.take_in_step() runs under the intake lock only: call notify.take_in()'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO st FROM notify.intake_steps ORDER BY step DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'notify.intake_steps is empty: the intake has no position'
            USING HINT = 'Switch with notify.enqueue_by(''trigger'') and back to ''intake''.';
    END IF;
    prev := st.taken_to;
    tgt := st.target;
    pt := st.pos_txid;
    pi := st.pos_id;
    bigs := st.big_txids;
    afters := st.big_after;
    IF tgt IS NULL THEN
        tgt := pg_current_snapshot();
        pt := NULL;
        pi := NULL;
    END IF;
    IF pg_snapshot_xmax(tgt) < pg_snapshot_xmax(prev) THEN
        RAISE EXCEPTION 'the intake''s position (%) is ahead of this server''s transactions (%)',
                        pg_snapshot_xmax(prev), pg_snapshot_xmax(tgt)
            USING ERRCODE = 'data_corrupted',
                  HINT = 'The database was restored into another cluster; see docs/OPERATIONS.md, "Intake".';
    END IF;

    SELECT q.slot, now() + make_interval(secs => qs.slot_secs) INTO s, horizon
    FROM notify.queue_slots AS q, notify.queue_settings AS qs WHERE q.state = 'current';
    IF NOT FOUND THEN
        s := NULL;
        horizon := '-infinity';  -- no current slot: everything to queue_later, nothing lost
    END IF;
    -- One statement copies rows: those of txids in [$1, $2) after ($3, $4) in (txid, id)
    -- order, at most $5, into the current slot (or queue_later, when not due within the
    -- slot period $6); it answers how many, the last row, and how many of the last txid.
    copy_sql := format($q$
            WITH b AS MATERIALIZED (
                SELECT e.id, e.txid, e.run_at, COALESCE(t.priority, 0) AS priority
                FROM (SELECT e.id, e.txid, e.run_at, e.event_type FROM notify.events AS e
                      WHERE e.txid >= $1 AND e.txid < $2 AND (e.txid, e.id) > ($3, $4)
                      ORDER BY e.txid, e.id LIMIT $5) AS e
                LEFT JOIN notify.event_types AS t ON t.name = e.event_type
            ), due AS (
                INSERT INTO %s (event_id, priority, run_at)
                SELECT b.id, b.priority, b.run_at FROM b WHERE b.run_at <= $6
            ), later AS (
                INSERT INTO notify.queue_later (event_id, priority, run_at)
                SELECT b.id, b.priority, b.run_at FROM b WHERE NOT b.run_at <= $6
                ON CONFLICT (event_id) DO NOTHING
            ), l AS (
                SELECT b.txid, b.id FROM b ORDER BY b.txid DESC, b.id DESC LIMIT 1
            )
            SELECT (SELECT count(*) FROM b)::integer, l.txid, l.id,
                   (SELECT count(*) FROM b WHERE b.txid = l.txid)::integer
            FROM (SELECT 1) AS one LEFT JOIN l ON true$q$,
        CASE WHEN s IS NULL THEN 'notify.queue_later' ELSE format('notify.queue_%s', s) END);

    -- The step's transactions as half-open ranges [lo, hi) of txids, in order: those in
    -- progress at taken_to that have ended since, then every txid from taken_to's xmax up
    -- to the target's, split around the ones still in progress (their rows are never
    -- walked, however many there are).
    FOR x IN SELECT v::text::bigint FROM pg_snapshot_xip(prev) AS v
             WHERE pg_visible_in_snapshot(v, tgt) ORDER BY 1 LOOP
        los := los || x;
        his := his || (x + 1);
    END LOOP;
    lo := pg_snapshot_xmax(prev)::text::bigint;
    FOR x IN SELECT v::text::bigint FROM pg_snapshot_xip(tgt) AS v
             WHERE v >= pg_snapshot_xmax(prev) ORDER BY 1 LOOP
        IF x > lo THEN
            los := los || lo;
            his := his || x;
        END IF;
        lo := x + 1;
    END LOOP;
    IF pg_snapshot_xmax(tgt)::text::bigint > lo THEN
        los := los || lo;
        his := his || pg_snapshot_xmax(tgt)::text::bigint;
    END IF;

    budget := max_rows;
    FOR i IN 1 .. coalesce(array_length(los, 1), 0) LOOP
        CONTINUE WHEN pt IS NOT NULL AND his[i]::text::xid8 <= pt;
        EXECUTE copy_sql
        INTO got, last_t, last_i, last_n
        USING los[i]::text::xid8, his[i]::text::xid8, COALESCE(pt, '0'::xid8),
              COALESCE(pi, -9223372036854775808), budget, horizon;
        taken := taken + got;
        budget := budget - got;
        IF got > 0 THEN
            pt := last_t;
            pi := last_i;
        END IF;
        IF budget <= 0 THEN
            walked := false;
            IF last_n >= chunk THEN
                -- A big transaction: the rest of it goes in chunks, after the small ones.
                fresh := true;
                fresh_t := last_t;
                fresh_a := last_i;
                pi := 9223372036854775807;
            END IF;
            EXIT;
        END IF;
    END LOOP;

    -- The big transactions of earlier calls, `chunk` rows each.
    FOR i IN 1 .. coalesce(array_length(bigs, 1), 0) LOOP
        EXECUTE copy_sql
        INTO got, last_t, big_last, last_n
        USING bigs[i], (bigs[i]::text::bigint + 1)::text::xid8, bigs[i], afters[i], chunk,
              horizon;
        taken := taken + got;
        IF got >= chunk THEN
            keep_t := keep_t || bigs[i];
            keep_a := keep_a || big_last;
        END IF;
    END LOOP;

    IF fresh THEN
        -- Found in this call, which has taken its first rows: chunks from the next call.
        keep_t := keep_t || fresh_t;
        keep_a := keep_a || fresh_a;
    END IF;
    IF walked THEN
        prev := tgt;
        tgt := NULL;
        pt := NULL;
        pi := NULL;
    END IF;
    more := tgt IS NOT NULL OR coalesce(array_length(keep_t, 1), 0) > 0;
    -- Nothing moved and no step was under way: the position stays as it was (a read-only
    -- call, no row written; the next call starts from the same taken_to).
    IF taken = 0 AND st.target IS NULL AND tgt IS NULL AND keep_t = st.big_txids THEN
        RETURN;
    END IF;
    INSERT INTO notify.intake_steps (taken_to, target, pos_txid, pos_id, big_txids, big_after, taken)
    VALUES (prev, tgt, pt, pi, keep_t, keep_a, taken)
    RETURNING step INTO new_step;
    IF new_step % 512 = 0 THEN
        DELETE FROM notify.intake_steps WHERE step < new_step - 512;
    END IF;
END;
$$;

-- A worker's call: take in up to `max_rows` rows of small transactions and `chunk` of each
-- big one; `more` when there is more to take in right away. Returns (0, false) at once when
-- another worker holds the intake lock or the queue is fed by the trigger.
CREATE FUNCTION notify.take_in(max_rows integer DEFAULT 2000, chunk integer DEFAULT 500,
                               OUT taken integer, OUT more boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    taken := 0;
    more := false;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'notify.take_in() runs at READ COMMITTED, not %',
                        upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'Each of its statements needs a snapshot taken after the intake lock.';
    END IF;
    IF max_rows < 1 OR chunk < 1 OR chunk > max_rows THEN
        RAISE EXCEPTION 'notify.take_in(%, %): need 1 <= chunk <= max_rows', max_rows, chunk
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_try_advisory_xact_lock(7957707062626549762) THEN
        RETURN;
    END IF;
    IF (SELECT i.mode FROM notify.intake AS i) IS DISTINCT FROM 'intake' THEN
        RETURN;
    END IF;
    PERFORM set_config('notifyd.intake_locked', 'on', true);
    SELECT r.taken, r.more INTO taken, more FROM notify.take_in_step(max_rows, chunk) AS r;
    PERFORM set_config('notifyd.intake_locked', 'off', true);
END;
$$;

-- The switch; run as the owner of notify.events (it disables or enables its trigger).
CREATE FUNCTION notify.enqueue_by(wanted text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was  text;
    r    record;
    own  xid8;
    snap pg_snapshot;
BEGIN
    IF wanted IS NULL OR wanted NOT IN ('trigger', 'intake') THEN
        RAISE EXCEPTION 'notify.enqueue_by(%): the queue is fed by ''trigger'' or ''intake''', wanted
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'notify.enqueue_by() runs at READ COMMITTED, not %',
                        upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'active_sql_transaction';
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'notify.enqueue_by() runs in a transaction of its own (this one has written already)'
            USING ERRCODE = 'active_sql_transaction';
    END IF;
    -- Every INSERT in flight has committed, and new ones wait until this commits. Behind
    -- a transaction that holds the table, give up rather than hold every INSERT back.
    PERFORM set_config('lock_timeout', '5s', true);
    LOCK TABLE notify.events IN SHARE ROW EXCLUSIVE MODE;
    PERFORM pg_advisory_xact_lock(7957707062626549762);
    PERFORM set_config('notifyd.intake_locked', 'on', true);
    SELECT i.mode INTO was FROM notify.intake AS i FOR UPDATE;
    IF was = wanted THEN
        RETURN wanted;
    END IF;
    IF wanted = 'intake' THEN
        ALTER TABLE notify.events DISABLE TRIGGER events_enqueue;
        -- A later statement than the lock: everything visible here was queued by the
        -- trigger. A snapshot leaves out its own transaction; put it among those in
        -- progress, so that events this transaction inserts after the switch are taken in.
        own := pg_current_xact_id();
        snap := pg_current_snapshot();
        IF own < pg_snapshot_xmax(snap) THEN
            snap := format('%s:%s:%s', least(pg_snapshot_xmin(snap), own), pg_snapshot_xmax(snap),
                           array_to_string(ARRAY(SELECT x FROM pg_snapshot_xip(snap) AS x
                                                 UNION SELECT own ORDER BY 1), ','))::pg_snapshot;
        END IF;
        INSERT INTO notify.intake_steps (taken_to) VALUES (snap);
    ELSE
        -- Finish a step under way (its snapshot predates the lock), then take one whose
        -- snapshot is taken now: everything committed is in it.
        FOR pass IN 1 .. 2 LOOP
            LOOP
                SELECT * INTO r FROM notify.take_in_step(100000, 100000);
                EXIT WHEN NOT r.more;
            END LOOP;
        END LOOP;
        ALTER TABLE notify.events ENABLE TRIGGER events_enqueue;
    END IF;
    UPDATE notify.intake SET mode = wanted, switched_at = now();
    RETURN wanted;
END;
$$;

-- The committed events not yet taken in (none in trigger mode): one definition for the
-- operators' count and for the cheap "any left?". No SET clause, so that the planner
-- inlines it into its caller (an EXISTS stops at the first row); its callers are notifyd's
-- own sessions.
CREATE FUNCTION notify.intake_waiting() RETURNS TABLE (id bigint, event_type text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH st AS (SELECT * FROM notify.intake_steps ORDER BY step DESC LIMIT 1)
    SELECT e.id, e.event_type, e.created_at FROM notify.events AS e, st
    WHERE (SELECT i.mode FROM notify.intake AS i) = 'intake'
      AND (e.txid >= pg_catalog.pg_snapshot_xmax(st.taken_to)
           OR e.txid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip(st.taken_to))))
      AND NOT (st.target IS NOT NULL AND pg_catalog.pg_visible_in_snapshot(e.txid, st.target)
               AND (e.txid, e.id) <= (st.pos_txid, st.pos_id))
    UNION ALL
    SELECT e.id, e.event_type, e.created_at FROM notify.events AS e, st,
           unnest(st.big_txids, st.big_after) AS b (txid, after_id)
    WHERE (SELECT i.mode FROM notify.intake AS i) = 'intake'
      AND e.txid = b.txid AND e.id > b.after_id
$$;

-- For operators (`notifyd status`, /metrics): how the queue is fed, how many committed
-- events wait to be taken in, and the oldest one's creation.
CREATE FUNCTION notify.intake_backlog(OUT mode text, OUT waiting bigint, OUT oldest timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (SELECT i.mode FROM notify.intake AS i), count(*), min(w.created_at)
    FROM notify.intake_waiting() AS w
$$;

-- Whether any committed event (of a type with at most `max_priority`, if given) waits to be
-- taken in: an EXISTS, cheap enough to poll (benchmarks wait on it for a drain).
CREATE FUNCTION notify.intake_has_waiting(max_priority integer DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM notify.intake_waiting() AS w
        WHERE max_priority IS NULL
           OR COALESCE((SELECT t.priority FROM notify.event_types AS t
                        WHERE t.name = w.event_type), 0) <= max_priority)
$$;
