-- name: service_key_get_or_make
-- The key named $1, made with the value $2 if there is none yet. NULL when another
-- process made it at the same moment (its row is not in this statement's snapshot): ask
-- again.
WITH made AS (
    INSERT INTO service_keys (name, value) VALUES ($1, $2)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM made
UNION ALL
SELECT value FROM service_keys WHERE name = $1
LIMIT 1;
