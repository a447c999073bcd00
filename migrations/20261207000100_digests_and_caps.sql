-- Digests of rate-limited events, critical event types and per-type caps (issue 17).
--
-- What the worker does with it (src/store.rs, src/digest.rs):
-- * `notify.event_types.max_per_window`: a per-type cap inside the user's total. NULL: no
--   cap of its own. 0: the type is never delivered, only counted in digests.
-- * `notify.event_types.critical`: the type is counted apart from the user's total (its own
--   budget, bounded by its own `max_per_window`, which a critical type must have), and a
--   preference cannot switch it off. So 100 chat messages cannot keep a security alert
--   out, and a backend loop sending alerts is still bounded by the alert type's cap.
-- * `notify.rate_windows.type_*`: per-type stamps of deliveries of capped types (one
--   entry per store transaction and type), next to the per-user `stamps`/`counts`, in the
--   same row under the same lock, so every cap is as exact as the total. A cap set on a
--   type counts its deliveries from then on. `stamps`/`counts` now hold the
--   non-critical deliveries only (digests included).
-- * `notify.digest_pending`: per user and type, how many events the limit suppressed
--   since the user's last digest. Written in the store transaction that decides
--   `rate_limited`, under the user's lock; emptied by the digest sweep in the transaction
--   that stores the user's digest notification (type `digest`, with `digest` jsonb).
--
-- Expand only (migrations/README.md): new columns with defaults or nullable, a new table,
-- a new trigger, new seeded types, and two checks added NOT VALID on hot tables (new rows
-- are checked; no scan under a lock). `notifications.event_id` becomes nullable, for the
-- digests, which have no event; a check keeps every other row with one.
-- Deploy rule: workers of the previous release neither write the per-type entries nor the
-- pending digests, and they count critical types in the total. Replace all workers at once
-- for this release, as for 20261201000001.

ALTER TABLE notify.event_types
    ADD COLUMN critical boolean NOT NULL DEFAULT false,
    ADD COLUMN max_per_window integer
        CONSTRAINT event_types_max_per_window_not_negative CHECK (max_per_window >= 0),
    -- How a digest names this type's events: a plural noun phrase ("new messages"). NULL:
    -- the type's name with spaces for underscores.
    ADD COLUMN digest_label text
        CONSTRAINT event_types_digest_label_format
        CHECK (char_length(digest_label) BETWEEN 1 AND 60
               AND digest_label ~ '^[[:alnum:]][[:alnum:] ,.()''-]*$'),
    -- A critical type is counted apart from the total, so it must have a bound of its own.
    ADD CONSTRAINT event_types_critical_needs_cap
        CHECK (NOT critical OR COALESCE(max_per_window, 0) >= 1),
    -- The worker writes `digest` notifications; they are one against the user's total.
    ADD CONSTRAINT event_types_digest_fixed
        CHECK (name <> 'digest' OR (NOT critical AND max_per_window IS NULL));

UPDATE notify.event_types SET digest_label = 'new messages' WHERE name = 'new_message';
UPDATE notify.event_types SET digest_label = 'status changes' WHERE name = 'status_change';
UPDATE notify.event_types SET digest_label = 'system alerts' WHERE name = 'system_alert';

INSERT INTO notify.event_types (name, description, critical, max_per_window, digest_label)
VALUES
    ('security_alert', 'A security event on the user''s account (a new sign-in, a password change)',
     true, 20, 'security alerts'),
    ('digest', 'What the rate limit held back (written by the worker; never enqueued)',
     false, NULL, 'digests')
ON CONFLICT (name) DO NOTHING;

-- The backend never enqueues a digest: the worker writes them. NOT VALID: no scan of the
-- events already there (none can be a digest: the type is new).
ALTER TABLE notify.events
    ADD CONSTRAINT events_event_type_not_digest CHECK (event_type <> 'digest') NOT VALID;

-- A preference cannot switch off a critical type, nor digests: refused at INSERT or
-- UPDATE, with a constraint name the client sees (SQLSTATE 23514, like a check). A row
-- that was already off when its type became critical is ignored by the worker.
CREATE FUNCTION notify.preferences_type_always_on() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM notify.event_types AS t
               WHERE t.name = NEW.event_type AND (t.critical OR t.name = 'digest')) THEN
        RAISE EXCEPTION 'event type "%" cannot be switched off', NEW.event_type
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'preferences_type_always_on',
                  SCHEMA = 'notify',
                  TABLE = 'preferences',
                  COLUMN = 'enabled',
                  HINT = 'Critical types and digests are always delivered; see notify.event_types.critical.';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER preferences_type_always_on
    BEFORE INSERT OR UPDATE ON notify.preferences
    FOR EACH ROW WHEN (NOT NEW.enabled)
    EXECUTE FUNCTION notify.preferences_type_always_on();

-- Per-type delivery stamps, in the user's rate row (same lock, same HOT update): entry i is
-- one store transaction's deliveries of type `type_names[i]`, `type_counts[i]` of them at
-- `type_stamps[i]`. Newest first; the store keeps the last 7 days and, per type, no more
-- entries than can change a decision.
ALTER TABLE notify.rate_windows
    ADD COLUMN type_stamps timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN type_names text[] NOT NULL DEFAULT '{}',
    ADD COLUMN type_counts integer[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT rate_windows_types_same_length
        CHECK (cardinality(type_stamps) = cardinality(type_names)
               AND cardinality(type_names) = cardinality(type_counts));

-- Suppressed events waiting for the user's next digest, per user and type. Only the worker
-- writes it, under the user's lock (the user's notify.rate_windows row). `due_at`: the
-- earliest time the user's window can have room (now, when the store writes the row; the
-- sweep moves it to when the oldest stamp in the window leaves it, when it finds no room),
-- so a sweep looks only at users that may be ready, through `digest_pending_due`.
CREATE TABLE notify.digest_pending (
    user_id    text NOT NULL,
    event_type text NOT NULL,
    suppressed integer NOT NULL CONSTRAINT digest_pending_suppressed_positive CHECK (suppressed > 0),
    first_at   timestamptz NOT NULL,
    last_at    timestamptz NOT NULL,
    due_at     timestamptz NOT NULL,
    PRIMARY KEY (user_id, event_type)
);

CREATE INDEX digest_pending_due ON notify.digest_pending (due_at);

-- A digest notification: `event_id` NULL, `digest` its structured counts
-- ({"total": 12, "counts": {"new_message": 9, "status_change": 3}, "first_at": ..., "last_at": ...}).
ALTER TABLE notify.notifications ALTER COLUMN event_id DROP NOT NULL;
ALTER TABLE notify.notifications ADD COLUMN digest jsonb;
ALTER TABLE notify.notifications
    ADD CONSTRAINT notifications_event_or_digest
    CHECK (event_id IS NOT NULL OR (digest IS NOT NULL AND event_type = 'digest')) NOT VALID;
