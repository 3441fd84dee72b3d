-- Case endpoints (alerting/cases_api.py).

-- name: cases_list
-- $1 states, $2 assignee, $3 a cell and everything below it, $4 priorities (NULL: any),
-- $5 cursor (ids below it), $6 limit. Newest first.
WITH RECURSIVE scope AS (
    SELECT id FROM cells WHERE id = $3::text
    UNION
    SELECT c.id FROM cells c JOIN scope s ON c.parent_id = s.id
)
SELECT * FROM cases
WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
  AND ($2::text IS NULL OR assignee = $2::text)
  AND ($3::text IS NULL OR cell_id IN (SELECT id FROM scope))
  AND ($4::text[] IS NULL OR priority = ANY($4::text[]))
  AND ($5::bigint IS NULL OR id < $5::bigint)
ORDER BY id DESC
LIMIT $6;
