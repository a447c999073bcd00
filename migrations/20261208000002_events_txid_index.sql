-- no-transaction
-- The intake's index (migration 20261208000001): the events of one step are found by a
-- range of transaction ids, in (txid, id) order, so that the walk never reads the rows of a
-- transaction still in progress, nor those taken in before, however long a transaction
-- stays open. Rows before the intake (txid NULL) are not indexed.
--
-- CONCURRENTLY: inserts go on while it builds. It cannot run in a transaction, hence the
-- marker above. If the build fails (a deadlock, a cancel), PostgreSQL leaves an INVALID
-- index of that name, which IF NOT EXISTS would then accept: drop it
-- (`DROP INDEX CONCURRENTLY notify.events_txid`) and run `notifyd migrate` again; the
-- worker warns at start-up while the index is invalid.
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_txid ON notify.events (txid, id)
    WHERE txid IS NOT NULL;
