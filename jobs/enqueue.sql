-- notifyd: enqueue examples for backend developers.
--
-- Every statement here is plain SQL against the public contract (schema `notify`); none of
-- it touches the queue's own tables. The file runs as-is against a migrated database:
--
--     psql -X -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -f jobs/enqueue.sql
--
-- (tests/jobs_docs.rs does exactly that, then runs the events through the real pipeline
-- and checks what each one became.) In application code, replace the literals with bind
-- parameters; jobs/enqueue_example.py shows that with psycopg 3. See jobs/README.md for
-- every column, limit and error.
--
-- Statements marked `-- name: ...` are the ones jobs/README.md quotes.

\set ON_ERROR_STOP on

-- ---------------------------------------------------------------------------------------
-- One event per type. Only user_id, event_type and body are required.
-- ---------------------------------------------------------------------------------------

-- name: enqueue_new_message
-- A new message. The body only points to the content; never put the content itself (or
-- any secret) in a notification.
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('42', 'new_message', 'You have a new message from Alice', '/messages/1001');

-- name: enqueue_status_change
-- user_id is text and must equal the JWT `sub` claim exactly: integer ids are written as
-- text ('42'), UUIDs as their canonical string.
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('7d9f2c1e-5b7a-4c3e-9a61-0f2b8e4d1c55', 'status_change',
        'Order #1042 has shipped', '/orders/1042');

-- name: enqueue_system_alert
-- No link: the column is optional.
INSERT INTO notify.events (user_id, event_type, body)
VALUES ('42', 'system_alert', 'Scheduled maintenance on Sunday 02:00-03:00 UTC');

-- ---------------------------------------------------------------------------------------
-- Idempotency: a retried transaction must not notify twice.
-- ---------------------------------------------------------------------------------------

-- name: enqueue_idempotent
-- Derive the key from the business fact ("message 1002 was sent"), not from the attempt.
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
VALUES ('42', 'new_message', 'You have a new message from Bob', '/messages/1002',
        'message:1002:new_message');

-- The same key again is a silent no-op, even as a plain INSERT ("INSERT 0 0"): the first
-- row is kept unchanged and no second job is queued.
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
VALUES ('42', 'new_message', 'You have a new message from Bob', '/messages/1002',
        'message:1002:new_message');

-- name: enqueue_idempotent_on_conflict
-- ON CONFLICT DO NOTHING works too, and is what to use when two transactions may race with
-- the same new key: the loser then gets nothing instead of a unique violation.
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
VALUES ('42', 'new_message', 'You have a new message from Bob', '/messages/1002',
        'message:1002:new_message')
ON CONFLICT (idempotency_key) DO NOTHING;

-- ---------------------------------------------------------------------------------------
-- Delay: the event is not processed before run_at.
-- ---------------------------------------------------------------------------------------

-- name: enqueue_delayed
INSERT INTO notify.events (user_id, event_type, body, link, run_at, idempotency_key)
VALUES ('42', 'system_alert', 'Your trial ends in 24 hours', '/billing',
        now() + interval '1 day', 'trial-ending:42');

-- ---------------------------------------------------------------------------------------
-- Links: a relative path starting with one '/', or an http(s) URL with a plain host.
-- ---------------------------------------------------------------------------------------

-- name: enqueue_relative_link
-- Query string and fragment are fine.
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('42', 'status_change', 'Your report is ready', '/reports/77?format=pdf#summary');

-- name: enqueue_absolute_link
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('42', 'system_alert', 'Read the incident write-up', 'https://status.example.com/incidents/12');

-- ---------------------------------------------------------------------------------------
-- Many users at once: one INSERT ... SELECT (one statement, one set-based enqueue).
-- ---------------------------------------------------------------------------------------

-- name: enqueue_fan_out
INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
SELECT u, 'system_alert', 'New terms of service take effect on 1 January',
       'tos-2027:' || u
FROM unnest(ARRAY['42', '43', '44']) AS u;

-- ---------------------------------------------------------------------------------------
-- Transactions: the event is enqueued if and only if the surrounding transaction commits.
-- ---------------------------------------------------------------------------------------

BEGIN;
-- ... the business write goes here, in the same transaction ...
INSERT INTO notify.events (user_id, event_type, body, link, idempotency_key)
VALUES ('43', 'new_message', 'You have a new message from Carol', '/messages/1003',
        'message:1003:new_message');
COMMIT;

BEGIN;
INSERT INTO notify.events (user_id, event_type, body, idempotency_key)
VALUES ('43', 'new_message', 'This one is rolled back and never delivered',
        'example:rolled-back');
ROLLBACK;  -- nothing was enqueued: no event row, no job

-- ---------------------------------------------------------------------------------------
-- Event types: adding one is one INSERT (lowercase snake case, at most 63 characters).
-- The worker needs no restart or deploy.
-- ---------------------------------------------------------------------------------------

-- name: add_event_type
INSERT INTO notify.event_types (name, description)
VALUES ('weekly_digest', 'The weekly summary is ready')
ON CONFLICT (name) DO NOTHING;

INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('44', 'weekly_digest', 'Your weekly summary is ready', '/digest/2026-47');

-- Caps and critical types (jobs/README.md, "Event types: caps, critical types and
-- digests"): one statement each. RETURNING name gives no row for a type that does not exist.

-- name: set_type_cap
-- At most 20 of this type per user per window, inside the user's total.
UPDATE notify.event_types SET max_per_window = 20 WHERE name = 'weekly_digest' RETURNING name;

-- name: add_critical_type
-- A critical type: its own budget of 5 per user per window, apart from the total, and no
-- preference can switch it off (preferences_type_always_on).
INSERT INTO notify.event_types (name, description, critical, max_per_window, digest_label)
VALUES ('payment_failed', 'A payment of the user failed', true, 5, 'failed payments')
ON CONFLICT (name) DO NOTHING;

-- ---------------------------------------------------------------------------------------
-- Preferences: one switch per (user, event type). A missing row means enabled.
-- ---------------------------------------------------------------------------------------

-- name: set_preference
-- Upsert the switch. Here user 45 turns status changes off.
INSERT INTO notify.preferences (user_id, event_type, enabled)
VALUES ('45', 'status_change', false)
ON CONFLICT (user_id, event_type)
DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now();

-- Preferences are applied when the worker processes an event, so this one is recorded as
-- `opted_out` and never becomes a notification ...
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('45', 'status_change', 'Order #2001 has shipped', '/orders/2001');

-- ... while the user's other types are delivered as usual.
INSERT INTO notify.events (user_id, event_type, body, link)
VALUES ('45', 'new_message', 'You have a new message from Dave', '/messages/1004');

-- name: list_preferences
-- A user's effective switches, one row per event type (missing row = enabled).
SELECT t.name AS event_type, COALESCE(p.enabled, true) AS enabled
FROM notify.event_types AS t
LEFT JOIN notify.preferences AS p ON p.event_type = t.name AND p.user_id = '45'
ORDER BY t.name;

-- ---------------------------------------------------------------------------------------
-- Read state: the backend marks notifications read (the HTTP service is read-only).
-- ---------------------------------------------------------------------------------------

-- name: mark_read
-- The user_id condition is what keeps one user from marking another user's notifications:
-- always pass the authenticated user. (Here the ids do not exist yet: UPDATE 0.)
UPDATE notify.notifications SET read_at = now()
WHERE user_id = '42' AND id = ANY('{1,2}'::bigint[]);

-- name: mark_all_read
UPDATE notify.notifications SET read_at = now()
WHERE user_id = '42' AND read_at IS NULL;

-- ---------------------------------------------------------------------------------------
-- Outcomes: one per event, in the view notify.event_outcomes (NULL = not processed yet).
-- A stored event's record is its notification; the worker writes the other outcomes
-- (suppressed, invalid) on the notify.events row, where the two queries after the first
-- read them through the events_suppressed index.
-- ---------------------------------------------------------------------------------------

-- name: event_status
-- What became of one event (look it up by your idempotency key, or by the id RETURNING gave).
SELECT event_id, outcome, outcome_reason, processed_at, notification_id
FROM notify.event_outcomes
WHERE idempotency_key = 'message:1002:new_message';

-- name: suppressed_counts
-- Suppressed events per user and type over the last 24 hours (uses the events_suppressed
-- index). Suppressed events are kept and counted, never silently dropped.
SELECT user_id,
       event_type,
       count(*) FILTER (WHERE outcome = 'rate_limited') AS rate_limited,
       count(*) FILTER (WHERE outcome = 'opted_out')    AS opted_out,
       count(*) FILTER (WHERE outcome = 'invalid')      AS invalid
FROM notify.events
WHERE outcome IN ('rate_limited', 'opted_out', 'invalid')
  AND processed_at > now() - interval '24 hours'
GROUP BY user_id, event_type
ORDER BY user_id, event_type;

-- name: invalid_reasons
-- Events the worker refused, with the reason (rows that got past the constraints but not
-- past the sanitizer, e.g. a body that was nothing but markup).
SELECT id, user_id, event_type, outcome_reason, processed_at
FROM notify.events
WHERE outcome = 'invalid'
  AND processed_at > now() - interval '24 hours'
ORDER BY processed_at DESC
LIMIT 100;

-- name: backlog
-- Events due but not processed yet, and delayed ones still waiting.
SELECT count(*) FILTER (WHERE run_at <= now()) AS due,
       count(*) FILTER (WHERE run_at > now())  AS delayed
FROM notify.event_outcomes
WHERE outcome IS NULL;
