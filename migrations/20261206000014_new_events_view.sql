-- notify.new_events: the enqueue contract for ORMs.
--
-- A repeated idempotency key is skipped on notify.events by a BEFORE INSERT trigger that
-- returns NULL (or by ON CONFLICT DO NOTHING), so `INSERT ... RETURNING id` returns no row.
-- Plain SQL copes with that; an ORM does not: Django's `Model.objects.create()` fails with
-- "'NoneType' object is not iterable" and SQLAlchemy's ORM with "did not produce a new
-- primary key result" on exactly the retry the key exists for.
--
-- This view has the columns a backend writes and reads, over notify.events, and an
-- INSTEAD OF INSERT trigger that inserts into notify.events. Every row inserted through it
-- comes back from RETURNING: a new event with its new id, a repeated key with the ORIGINAL
-- event's id and stored values (what was sent the second time is dropped, as on the
-- table). Nothing else changes: notify.events, its constraints (their names reach the
-- client unchanged, from the inner INSERT), its triggers and `ON CONFLICT
-- (idempotency_key)` on it work as before.
--
-- Expand only (migrations/README.md): a new view and function; no running code reads them.
--
-- Semantics, per row:
-- * `id` cannot be supplied (as on the table, SQLSTATE 428C9);
-- * `run_at` NULL or omitted means now() (ORMs send NULL for an unset field);
--   `created_at` is always now();
-- * the inner INSERT uses `ON CONFLICT (idempotency_key) DO NOTHING`, so two transactions
--   racing with the same new key do not fail: the second waits for the first, then returns
--   the first's id when it committed, or inserts its own row when it rolled back. (Under
--   REPEATABLE READ or SERIALIZABLE the second gets a serialization failure instead, as
--   with ON CONFLICT on the table; retrying the transaction then returns the first's id.)
-- * a retention delete racing the lookup of an original row (the key is free again) makes
--   the loop insert the row instead; it gives up with an error after a few rounds.
-- * One job per event as always; but each row is its own inner INSERT, so a multi-row
--   INSERT into the view fires the events_enqueue statement trigger once per row. Fan-outs
--   to many users belong on notify.events (INSERT ... SELECT), as before.
--
-- Privileges: the function runs as the caller (no SECURITY DEFINER), so inserting through
-- the view needs INSERT and SELECT on the view and the same rights as an
-- `INSERT ... RETURNING` into notify.events (INSERT, and SELECT for the original row's
-- lookup): the INSERT path grants nothing the table does not. The view stays a simple
-- view for the rest, so SELECT (and UPDATE or DELETE, which no backend is meant to have)
-- check notify.events's rights as the view's owner, as for any view: grant a backend
-- INSERT and SELECT on it, nothing more. The trigger function has a fixed search_path.

CREATE VIEW notify.new_events AS
SELECT e.id, e.user_id, e.event_type, e.body, e.link, e.idempotency_key, e.run_at, e.created_at
FROM notify.events AS e;

ALTER VIEW notify.new_events ALTER COLUMN run_at SET DEFAULT now();
ALTER VIEW notify.new_events ALTER COLUMN created_at SET DEFAULT now();

COMMENT ON VIEW notify.new_events IS
    'Enqueue through an ORM: INSERT here returns the event id, the original one for a repeated idempotency_key';

CREATE FUNCTION notify.insert_new_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stored notify.events%ROWTYPE;
BEGIN
    IF NEW.id IS NOT NULL THEN
        RAISE EXCEPTION 'cannot insert a non-DEFAULT value into column "id"'
            USING ERRCODE = 'generated_always',
                  DETAIL = 'Column "id" of notify.new_events is an identity column defined as GENERATED ALWAYS.';
    END IF;
    FOR attempt IN 1..5 LOOP
        INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key, run_at)
        VALUES (NEW.user_id, NEW.event_type, NEW.body, NEW.link, NEW.idempotency_key,
                COALESCE(NEW.run_at, now()))
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING * INTO stored;
        IF NOT FOUND THEN
            -- A repeated key (skipped by events_skip_repeated or by ON CONFLICT): the
            -- original row. Each statement here takes a new snapshot (READ COMMITTED), so
            -- a row committed by a transaction the INSERT waited for is visible.
            SELECT * INTO stored FROM notify.events AS e
            WHERE e.idempotency_key = NEW.idempotency_key;
        END IF;
        IF stored.id IS NOT NULL THEN
            NEW.id := stored.id;
            NEW.user_id := stored.user_id;
            NEW.event_type := stored.event_type;
            NEW.body := stored.body;
            NEW.link := stored.link;
            NEW.idempotency_key := stored.idempotency_key;
            NEW.run_at := stored.run_at;
            NEW.created_at := stored.created_at;
            RETURN NEW;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'notify.new_events: the event with idempotency_key % was neither inserted nor found', NEW.idempotency_key
        USING ERRCODE = 'serialization_failure',
              HINT = 'An event with this key was deleted while this one was inserted; retry the transaction.';
END;
$$;

CREATE TRIGGER new_events_insert
    INSTEAD OF INSERT ON notify.new_events
    FOR EACH ROW
    EXECUTE FUNCTION notify.insert_new_event();
