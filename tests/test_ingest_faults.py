"""Ingest under faults: the database goes away mid-stream and comes back."""

from __future__ import annotations

import asyncio

from tests.ingest_helpers import (
    TEST_DEVICES,
    fetchval,
    publish,
    publisher,
    register_devices,
    running_ingest,
    settings_for,
    wait_for,
)
from tests.tcp_proxy import TcpProxy


async def test_database_cut_mid_stream_loses_nothing_and_stores_nothing_twice(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    await proxy.start()
    settings = settings_for(
        proxy.database_url(database_url), mqtt_url, topic_prefix, batch_max_messages=50
    )
    total = 600
    count_sql = "SELECT count(*) FROM telemetry"
    async with running_ingest(settings) as service, publisher(mqtt_url) as client:
        for seq in range(total // 3):
            await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", {"seq": seq, "smoke": 1})
        await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n >= 50)
        await proxy.stop()  # PostgreSQL unreachable: open connections cut, new ones refused
        for seq in range(total // 3, total):
            await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", {"seq": seq, "smoke": 1})
        await asyncio.sleep(2.0)
        # Held within the Receive Maximum (4 batches of 50), the rest waits in the broker.
        assert service.source.depth() <= 4 * 50
        stored_during_outage = await fetchval(database_url, count_sql)
        assert stored_during_outage < total
        await proxy.start()
        stored = await wait_for(
            lambda: fetchval(database_url, count_sql), lambda n: n >= total, within_s=60
        )
    distinct = await fetchval(database_url, "SELECT count(DISTINCT seq) FROM telemetry")
    assert (stored, distinct) == (total, total)
    await proxy.stop()
