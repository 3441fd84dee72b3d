-- The ingest's device directory asks every few seconds what changed since its watermark
-- (devices_changed_summary) and reads the changes in pages ordered by (updated_at, id):
-- without an index both scanned the whole table, ~1,000,000 rows at a national fleet.
CREATE INDEX devices_updated_idx ON devices (updated_at, id);
