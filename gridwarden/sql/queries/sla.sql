-- name: sla_unassigned_due
-- Cases nobody was on duty for when they opened: still `reported`, no deadline of their
-- own yet (dispatch sets `due_at` only when it finds someone), and past the accept
-- deadline of their policy. Once retried they get a `due_at` and `cases_due` finds them.
SELECT * FROM cases
WHERE state = 'reported' AND due_at IS NULL
  AND created_at + make_interval(secs => (policy ->> 'accept')::float8) <= $1
ORDER BY id
LIMIT $2
FOR UPDATE SKIP LOCKED;

-- name: sla_clear_due
-- A deadline left on a case that waits for nobody any more (closed loop steps past
-- `on_site` carry none): forget it rather than fetch it on every tick.
UPDATE cases SET due_at = NULL, due_step = NULL WHERE id = $1;

-- name: sla_overdue_count
-- Open cases that have missed a deadline: a step marked missed (by an escalation, or
-- done late), past their current deadline, or never dispatched and past the accept one.
SELECT count(*) FROM cases
WHERE state IN ('reported', 'dispatched', 'accepted', 'on_site')
  AND (accept_met IS FALSE OR arrive_met IS FALSE OR resolve_met IS FALSE
       OR due_at <= $1
       OR (due_at IS NULL AND state = 'reported'
           AND created_at + make_interval(secs => (policy ->> 'accept')::float8) <= $1));
