-- The three text checks of notify.events, as functions (issue 16, a cheaper enqueue).
--
-- Why (measured, BENCHMARKS.md "The backend's INSERT"): PostgreSQL keeps a CHECK
-- constraint as the text of its expression tree and reads that text back (stringToNode)
-- at the start of every INSERT statement, prepared or not. The regular expressions made
-- those trees long: a text constant is stored one byte per token, so the three checks
-- with their Unicode character lists were parsed again for every single-row INSERT. In
-- perf, ExecConstraints was 10.6 % of the backend's time, 6.6 % in stringToNode alone.
-- A check that calls a function is a short tree; the function's expression is compiled
-- once per session by PL/pgSQL and its plan kept.
--
-- What does not change: the constraint names, what each refuses (the same expressions,
-- byte for byte, tests/contract.rs compares them on a hostile corpus), the SQLSTATE
-- (23514) and the message, so every backend's error handling keeps working.
--
-- Written for any caller's session:
-- * the patterns are E'' strings, so a session with standard_conforming_strings off reads
--   them the same (PL/pgSQL parses its expressions with the caller's settings);
-- * every operator and function is schema-qualified, so a caller's search_path cannot
--   put its own `!~` or `char_length` in place of pg_catalog's (these functions run with
--   the caller's rights, and a check a caller could redefine would be no check). A SET
--   search_path clause would do the same at the price of a settings change per call.
--
-- Deploy: the new checks are added NOT VALID. Every existing row was checked by the
-- constraint each replaces, which refused exactly the same values; new rows are checked.
-- Validating would scan all of notify.events at release for nothing; an operator may
-- still run `ALTER TABLE notify.events VALIDATE CONSTRAINT events_user_id_valid` (and the
-- others) at any time: it takes no lock that blocks inserts. Expand only: the columns,
-- names and behaviour are those of the previous release.
--
-- The swap is one ALTER TABLE, so the table is never without its checks. It needs the
-- table's ACCESS EXCLUSIVE lock for a moment, and while it waits for that lock every
-- backend INSERT and worker UPDATE of the table queues behind it. lock_timeout bounds
-- that wait to 1 s: behind a transaction that holds the table, the migration fails with
-- "canceling statement due to lock timeout", nothing has changed, and `notifyd migrate`
-- can simply run again.
-- The backend and worker roles need EXECUTE on the functions (PUBLIC has it by default;
-- `notifyd grants` grants it explicitly).

SET LOCAL lock_timeout = '1s';

CREATE FUNCTION notify.event_user_id_is_valid(v text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN pg_catalog.char_length(v) OPERATOR(pg_catalog.>=) 1
       AND pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 128
       AND v OPERATOR(pg_catalog.!~)
           E'[[:cntrl:]\\s\\u00a0\\u1680\\u2000-\\u200b\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]';
END;
$$;
COMMENT ON FUNCTION notify.event_user_id_is_valid(text) IS
    'The events_user_id_valid check: 1-128 characters, no control or space characters.';

CREATE FUNCTION notify.event_body_is_valid(v text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN pg_catalog.char_length(v) OPERATOR(pg_catalog.>=) 1
       AND pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 1000
       AND v OPERATOR(pg_catalog.~)
           E'[^\\s\\u00a0\\u1680\\u2000-\\u200b\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]';
END;
$$;
COMMENT ON FUNCTION notify.event_body_is_valid(text) IS
    'The events_body_length check: 1-1000 characters, not only spaces.';

CREATE FUNCTION notify.event_link_is_safe(v text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN pg_catalog.char_length(v) OPERATOR(pg_catalog.<=) 2048
       AND v OPERATOR(pg_catalog.!~)
           E'[[:cntrl:]\\s\\u00a0\\u2000-\\u200b\\u2028\\u2029\\u3000\\\\''"`<>]'
       AND (v OPERATOR(pg_catalog.~) '^/([^/]|$)'
            OR v OPERATOR(pg_catalog.~*)
               ('^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?'
                '(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?'
                '([/?#]|$)'));
END;
$$;
COMMENT ON FUNCTION notify.event_link_is_safe(text) IS
    'The events_link_safe check (for a non-NULL link): a relative path or an http(s) URL with a plain host.';

ALTER TABLE notify.events
    DROP CONSTRAINT events_user_id_valid,
    ADD CONSTRAINT events_user_id_valid
        CHECK (notify.event_user_id_is_valid(user_id)) NOT VALID,
    DROP CONSTRAINT events_body_length,
    ADD CONSTRAINT events_body_length
        CHECK (notify.event_body_is_valid(body)) NOT VALID,
    DROP CONSTRAINT events_link_safe,
    ADD CONSTRAINT events_link_safe
        CHECK (link IS NULL OR notify.event_link_is_safe(link)) NOT VALID;
