-- The dedup table's received_at index only serves the pruning DELETE (every 10 minutes),
-- yet a B-tree costs every claimed reading an index insert. Rows arrive in received_at
-- order, so a BRIN index finds the expired ones just as well for a fraction of the cost.
DROP INDEX telemetry_dedup_received_idx;
CREATE INDEX telemetry_dedup_received_brin ON telemetry_dedup USING brin (received_at);
