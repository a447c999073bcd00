-- notifyd schema, version 1.
--
-- The public contract for the backend is `notify.events` (enqueue), `notify.preferences`
-- (on/off switches) and `notify.notifications.read_at` (mark read). Everything else is
-- internal. apalis's own tables live in the `apalis` schema and are migrated separately
-- (their history is `apalis._sqlx_migrations`, ours is `notify._sqlx_migrations`).

CREATE SCHEMA IF NOT EXISTS notify;

-- Event types. Adding a type is one INSERT; the worker needs no restart.
CREATE TABLE notify.event_types (
    name        text PRIMARY KEY
                CONSTRAINT event_types_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description text NOT NULL DEFAULT ''
);

INSERT INTO notify.event_types (name, description) VALUES
    ('new_message',   'A user received a new message'),
    ('status_change', 'Something the user follows changed status'),
    ('system_alert',  'An operator or system alert addressed to the user');

-- The enqueue contract. One row per event; the worker records the outcome on the row.
-- Rows are kept for the retention window (7 days by default) and then deleted in batches.
CREATE TABLE notify.events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL
                    CONSTRAINT events_user_id_valid
                    CHECK (char_length(user_id) BETWEEN 1 AND 128
                           AND user_id !~ '[[:cntrl:]\s\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'),
    event_type      text NOT NULL
                    CONSTRAINT events_event_type_known REFERENCES notify.event_types (name),
    body            text NOT NULL
                    CONSTRAINT events_body_length
                    CHECK (char_length(body) BETWEEN 1 AND 1000
                           AND body ~ '[^\s\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]'),
    -- A relative path ("/inbox/7", not "//host") or an absolute http(s) URL with a plain
    -- host name and an optional port up to 65535: no user info, and no whitespace, control
    -- characters, backslashes, quotes, backticks or angle brackets anywhere.
    link            text
                    CONSTRAINT events_link_safe
                    CHECK (link IS NULL OR (
                        char_length(link) <= 2048
                        AND link !~ '[[:cntrl:]\s\u00a0\u2000-\u200b\u2028\u2029\u3000\\''"`<>]'
                        AND (link ~ '^/([^/]|$)'
                             OR link ~* ('^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?'
                                         '(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?'
                                         '([/?#]|$)'))
                    )),
    idempotency_key text
                    CONSTRAINT events_idempotency_key_unique UNIQUE
                    CONSTRAINT events_idempotency_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    run_at          timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Written by the worker, exactly once per event.
    outcome         text
                    CONSTRAINT events_outcome_known
                    CHECK (outcome IN ('stored', 'opted_out', 'rate_limited', 'invalid')),
    outcome_reason  text,
    processed_at    timestamptz
) WITH (fillfactor = 85);  -- room for the HOT update that records the outcome

CREATE INDEX events_created_at_brin ON notify.events USING brin (created_at);
-- Operators look for suppressed and invalid events; stored ones are the bulk.
CREATE INDEX events_suppressed ON notify.events (outcome, processed_at)
    WHERE outcome IN ('rate_limited', 'invalid', 'opted_out');

-- A repeated idempotency key is a silent no-op, even for a plain INSERT without
-- ON CONFLICT: the row is skipped before it reaches the unique constraint. Two
-- transactions racing with the same new key still meet the constraint; the loser
-- gets a unique violation (or nothing, with ON CONFLICT DO NOTHING).
CREATE FUNCTION notify.skip_repeated_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM notify.events WHERE idempotency_key = NEW.idempotency_key) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_skip_repeated
    BEFORE INSERT ON notify.events
    FOR EACH ROW WHEN (NEW.idempotency_key IS NOT NULL)
    EXECUTE FUNCTION notify.skip_repeated_event();

-- Per-user switches. A missing row means enabled.
CREATE TABLE notify.preferences (
    user_id    text NOT NULL
               CONSTRAINT preferences_user_id_valid CHECK (char_length(user_id) BETWEEN 1 AND 128),
    event_type text NOT NULL
               CONSTRAINT preferences_event_type_known REFERENCES notify.event_types (name) ON DELETE CASCADE,
    enabled    boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, event_type)
);

-- Deliverable notifications. Invariants:
-- * one notification per event (event_id is unique), so a job that runs twice stores once;
-- * per user, `id` grows in commit order (the worker serialises each user's inserts under a
--   per-user lock and draws ids after taking it), so `id > cursor` paging never skips a row;
-- * `created_at` is the rate-limit stamp: at most `limit` rows per user in any 60 minutes.
CREATE TABLE notify.notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    user_id    text NOT NULL,
    event_id   bigint NOT NULL CONSTRAINT notifications_one_per_event UNIQUE,
    event_type text NOT NULL,
    body       text NOT NULL,
    link       text,
    created_at timestamptz NOT NULL,
    read_at    timestamptz,
    PRIMARY KEY (user_id, id)
);

CREATE INDEX notifications_unread ON notify.notifications (user_id, id) WHERE read_at IS NULL;
CREATE INDEX notifications_created_at_brin ON notify.notifications USING brin (created_at);
