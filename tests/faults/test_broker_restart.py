"""A broker restart with persistence (a private Mosquitto, so no other test's broker
restarts): once while the service is connected, once while it is cut off and messages
wait in its session. The service reconnects, its persistent sessions resume: every
reading stored once, one alarm and one case per incident, one notification per dispatch."""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    anonymous_broker,
    assert_one_notification_per_dispatch,
    fault_env,
    phone,
    publish_readings,
    running_service,
    settled,
    setup_city,
    wait_heard,
)
from tests.ingest_helpers import fetchval, publish, publisher, wait_for
from tests.tcp_proxy import TcpProxy


@pytest.mark.slow
async def test_broker_restarts_lose_nothing_and_repeat_nothing(
    database_url, services_root, topic_prefix, tmp_path
):
    await setup_city(database_url)
    broker = anonymous_broker(services_root / f"broker-{topic_prefix}")
    broker.start()
    try:
        url = broker.url
        port = broker.port
        assert port is not None
        gate = TcpProxy(port)  # the service's way to the broker, for the second restart
        await gate.start()
        env = fault_env(database_url, gate.url, topic_prefix, tmp_path)
        count_sql = "SELECT count(*) FROM telemetry"
        async with (
            phone(url, topic_prefix) as listener,
            running_service(env, tmp_path / "service.log") as service,
        ):
            async with publisher(url) as device:  # before: an alarm and 100 readings
                await publish_readings(device, topic_prefix, "smoke-1", range(1, 2), alarm=True)
                await publish_readings(device, topic_prefix, "bin-1", range(100), fill=5)
            await wait_heard(listener, "w-li")
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n >= 101)

            # 1. Restarted under the connected service; readings published right after.
            broker.restart()
            async with publisher(url) as device:
                await publish_readings(device, topic_prefix, "bin-1", range(100, 300), fill=5)
                await publish_readings(device, topic_prefix, "cover-1", range(1, 2), tilt=30)
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n >= 302)

            # 2. The service cut off; what is published waits in its session, the broker
            # restarts (persisting it), then more is published and the service comes back.
            await gate.stop()
            async with publisher(url) as device:
                await publish_readings(device, topic_prefix, "bin-1", range(300, 500), fill=5)
                await publish(device, f"{topic_prefix}/dev/door-1/event",
                              {"seq": 1, "event": "door_forced"})  # fmt: skip
            broker.restart()
            async with publisher(url) as device:
                await publish_readings(device, topic_prefix, "bin-1", range(500, 600), fill=5)
            assert await fetchval(database_url, count_sql) == 302
            await gate.start()
            after = await settled(database_url, topic_prefix, listener, telemetry=602, cases=3)
            assert service.alive()
        await gate.stop()
    finally:
        broker.stop()
    assert (after.telemetry, after.distinct_readings) == (602, 602)
    assert after.events == 1
    assert after.alarms == {
        ("smoke-1", "smoke.alarm"): 1,
        ("cover-1", "manhole.tilted"): 1,
        ("door-1", "door.forced"): 1,
    }
    assert after.case_rows == 3
    assert "session present: True" in (tmp_path / "service.log").read_text()
    assert all(len(case["alarm_ids"]) == 1 for case in after.cases.values())
    assert_one_notification_per_dispatch(after, listener, {"w-li": 3})
