-- The audit log (gridwarden/audit.py): one row per case or admin action, and its list.

-- name: audit_record
-- $1 actor, $2 action, $3 target_type, $4 target_id, $5 detail (jsonb text), $6 address.
INSERT INTO audit_log (actor, action, target_type, target_id, detail, address)
VALUES ($1, $2, $3, $4, $5::jsonb, $6);

-- name: audit_list
-- Newest first. $1 action, $2 actor, $3 since, $4 until (each NULL: no filter; since is
-- inclusive, until exclusive), $5 cursor (the last id of the previous page), $6 limit.
SELECT id, at, actor, action, target_type, target_id, detail::text AS detail, address
FROM audit_log
WHERE ($1::text IS NULL OR action = $1::text)
  AND ($2::text IS NULL OR actor = $2::text)
  AND ($3::timestamptz IS NULL OR at >= $3::timestamptz)
  AND ($4::timestamptz IS NULL OR at < $4::timestamptz)
  AND ($5::bigint IS NULL OR id < $5::bigint)
ORDER BY id DESC
LIMIT $6;
