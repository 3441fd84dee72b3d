-- Ingest shards (ingest/shards.py): one owner per shard, for as long as its connection lives.

-- name: shard_try_lock
SELECT pg_try_advisory_lock($1::int, $2::int);

-- name: shard_unlock
SELECT pg_advisory_unlock($1::int, $2::int);

-- name: shard_join
-- Membership: each process holds (member class, its backend pid) while it lives.
SELECT pg_try_advisory_lock($1::int, pg_backend_pid());

-- name: shard_members
-- How many processes take part (in this database), counting the caller.
SELECT count(DISTINCT pid) FROM pg_locks
WHERE locktype = 'advisory' AND classid = $1::int::oid AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: shard_end_session
-- Ends a session of ours whose connection we lost (it would hold our locks until the
-- server notices, which behind a half-open connection can take very long).
SELECT pg_terminate_backend($1::int);
