-- Case statistics (alerting/stats.py).

-- name: case_stats
-- Cases created in [$2, $3) ($3 NULL: no upper bound), grouped by cell ($1 = 'cell') or
-- by assignee ($1 = 'worker'), plus one total row (`is_total`). Durations are seconds
-- from the report time; percentile_cont ignores the cases that never reached the step.
-- A step's deadline outcome (accept_met, arrive_met, resolve_met) is NULL until known.
WITH picked AS (
    SELECT CASE WHEN $1::text = 'worker' THEN assignee ELSE cell_id END AS key,
           state, escalations, rating, accept_met, arrive_met, resolve_met,
           extract(epoch FROM accepted_at - created_at)::float8 AS accept_s,
           extract(epoch FROM arrived_at - created_at)::float8 AS arrive_s,
           extract(epoch FROM resolved_at - created_at)::float8 AS resolve_s
    FROM cases
    WHERE created_at >= $2::timestamptz
      AND ($3::timestamptz IS NULL OR created_at < $3::timestamptz)
)
SELECT key,
       GROUPING(key) = 1 AS is_total,
       count(*) AS cases,
       count(*) FILTER (WHERE state IN ('resolved', 'verified', 'archived')) AS disposed,
       count(*) FILTER (WHERE accept_met) + count(*) FILTER (WHERE arrive_met)
           + count(*) FILTER (WHERE resolve_met) AS steps_met,
       count(accept_met) + count(arrive_met) + count(resolve_met) AS steps_timed,
       percentile_cont(ARRAY[0.5, 0.9]::float8[]) WITHIN GROUP (ORDER BY accept_s) AS accept_s,
       percentile_cont(ARRAY[0.5, 0.9]::float8[]) WITHIN GROUP (ORDER BY arrive_s) AS arrive_s,
       percentile_cont(ARRAY[0.5, 0.9]::float8[]) WITHIN GROUP (ORDER BY resolve_s) AS resolve_s,
       coalesce(sum(escalations), 0)::bigint AS escalations,
       avg(rating)::float8 AS rating_avg
FROM picked
GROUP BY GROUPING SETS ((key), ())
ORDER BY GROUPING(key), key NULLS LAST;
