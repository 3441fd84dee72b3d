"""Prometheus metrics of the ingest path (exposed at GET /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("gridwarden_ingest_received_total", "MQTT messages handed over by the broker")
STORED = Counter("gridwarden_ingest_stored_total", "Rows committed", ["table"])
DEAD_LETTERS = Counter(
    "gridwarden_ingest_dead_letters_total", "Rejected input, by reason", ["reason"]
)
DUPLICATES = Counter(
    "gridwarden_ingest_duplicates_total", "Readings dropped as a repeated (device_id, seq)"
)
BATCH_SIZE = Histogram(
    "gridwarden_ingest_batch_size",
    "Messages per committed batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
COMMIT_SECONDS = Histogram(
    "gridwarden_ingest_commit_seconds",
    "Time to commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUEUE_DEPTH = Gauge(
    "gridwarden_ingest_queue_depth", "Messages received and not yet taken into a batch"
)
DB_ERRORS = Counter(
    "gridwarden_ingest_db_errors_total", "Batch commits that failed and were retried"
)
SHARDS_OWNED = Gauge("gridwarden_ingest_shards_owned", "Ingest shards this process runs")
OTHER_SHARD = Counter(
    "gridwarden_ingest_other_shard_total",
    "Messages acknowledged unseen because another ingest shard stores them",
)
WRITTEN_AHEAD = Counter(
    "gridwarden_ingest_written_ahead_total",
    "Telemetry readings committed ahead of their bulk batch (a critical alarm not yet raised)",
)
