-- Change announcements for the read service (notifyd serve), and the retention horizon.
--
-- The read service keeps, per user, an in-memory snapshot (newest id, unread count, ...)
-- so that an empty poll needs no query. New notifications are announced by the worker
-- (channel notifyd_notifications, in the store transaction). Everything else that
-- changes a user's notifications is announced here, on channel notifyd_read_state,
-- by statement-level triggers (one NOTIFY per statement, not per row):
--   * UPDATE (the backend marking read): the user ids of the updated rows;
--   * DELETE (retention, or the backend): the user ids of the deleted rows;
--   * TRUNCATE: '*' (everyone).
-- Payloads are JSON arrays of user ids, split to stay under Postgres's 8000-byte limit.
-- NOTIFY is transactional: listeners hear it only if the statement's transaction commits.
--
-- notify.notification_horizons records, per user, the highest notification id ever
-- deleted. A client whose cursor is below it has missed deleted notifications, which the
-- read API reports as 410 cursor_expired. It holds one row per user who ever lost a
-- notification, updated once per DELETE statement (not per row).

CREATE TABLE notify.notification_horizons (
    user_id         text PRIMARY KEY,
    deleted_through bigint NOT NULL
);

-- Send the distinct user ids of `users` on notifyd_read_state, in payloads of at most
-- ~7000 bytes.
CREATE FUNCTION notify.announce_read_state(users text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- PERFORM runs the query to completion: one pg_notify per chunk.
    PERFORM pg_notify('notifyd_read_state', chunks.payload)
    FROM (
        SELECT json_agg(u.user_id ORDER BY u.user_id)::text AS payload
        FROM (
            SELECT d.user_id,
                   sum(octet_length(to_json(d.user_id)::text) + 1)
                       OVER (ORDER BY d.user_id) / 7000 AS part
            FROM (SELECT DISTINCT x AS user_id FROM unnest(users) AS x) AS d
        ) AS u
        GROUP BY u.part
    ) AS chunks;
END;
$$;

CREATE FUNCTION notify.notifications_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM notify.announce_read_state(
        ARRAY(SELECT user_id FROM old_rows UNION SELECT user_id FROM new_rows));
    RETURN NULL;
END;
$$;

CREATE FUNCTION notify.notifications_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Ordered by user, so concurrent deletes take the horizon rows' locks in the same
    -- order and cannot deadlock on each other.
    INSERT INTO notify.notification_horizons AS h (user_id, deleted_through)
    SELECT user_id, max(id) FROM old_rows GROUP BY user_id ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE
        SET deleted_through = EXCLUDED.deleted_through
        WHERE h.deleted_through < EXCLUDED.deleted_through;
    PERFORM notify.announce_read_state(ARRAY(SELECT user_id FROM old_rows));
    RETURN NULL;
END;
$$;

CREATE FUNCTION notify.notifications_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifyd_read_state', '*');
    RETURN NULL;
END;
$$;

CREATE TRIGGER notifications_announce_update
    AFTER UPDATE ON notify.notifications
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.notifications_updated();

CREATE TRIGGER notifications_announce_delete
    AFTER DELETE ON notify.notifications
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.notifications_deleted();

CREATE TRIGGER notifications_announce_truncate
    AFTER TRUNCATE ON notify.notifications
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify.notifications_truncated();
