"""A half-open database connection: the proxy keeps the service's live connections to
PostgreSQL open but silently drops what is sent on them (no FIN, no RST), while new
connections work. Nothing is lost (the broker holds the messages), and the ingest gets
going again on a new connection within COMMAND_TIMEOUT_S + RELEASE_TIMEOUT_S: the pool
has a command timeout, and gives a connection back with a timeout too (gridwarden/db.py;
without it the task waited for ever for the cancellation of its timed-out statement to be
answered); the shard lock (ingest/shards.py) ends its own stale session and takes its
shard back instead of believing another process took it over. On a real network the
kernel gives up on such a connection only after ~15 min."""

from __future__ import annotations

import pytest

from gridwarden.db import COMMAND_TIMEOUT_S, RELEASE_TIMEOUT_S
from tests.faults.harness import fault_env, publish_readings, running_service, setup_city
from tests.ingest_helpers import fetchval, publisher, wait_for
from tests.tcp_proxy import TcpProxy


@pytest.mark.slow
async def test_a_half_open_database_connection_does_not_stall_ingest(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    await setup_city(database_url)
    proxy = TcpProxy(int(database_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    env = fault_env(proxy.database_url(database_url), mqtt_url, topic_prefix, tmp_path)
    count_sql = "SELECT count(*) FROM telemetry"
    try:
        async with (
            publisher(mqtt_url) as device,
            running_service(env, tmp_path / "service.log"),
        ):
            await publish_readings(device, topic_prefix, "bin-1", range(1), fill=5)
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n == 1)
            proxy.blackhole()
            await publish_readings(device, topic_prefix, "bin-1", range(1, 11), fill=5)
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n == 11,
                           within_s=COMMAND_TIMEOUT_S + RELEASE_TIMEOUT_S + 10)  # fmt: skip
    finally:
        await proxy.stop()
