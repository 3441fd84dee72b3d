"""Duplicate deliveries: one (device, seq) published several times, and a broker
redelivery of a whole stream after `kill -9` (the broker never saw the PUBACKs: a proxy
swallowed them) → each reading stored once, one alarm with count 1, one case, one
notification."""

from __future__ import annotations

from functools import partial

import pytest

from tests.faults.harness import (
    assert_one_notification_per_dispatch,
    fault_env,
    phone,
    publish_readings,
    running_service,
    settled,
    setup_city,
)
from tests.ingest_helpers import publisher, wait_for
from tests.tcp_proxy import TcpProxy, drop_mqtt_packets

PUBACK = 4
READINGS = 50


@pytest.mark.slow
async def test_repeats_and_a_redelivery_after_kill_are_stored_once_with_one_alarm_and_case(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    await setup_city(database_url)
    broker_port = int(mqtt_url.rsplit(":", 1)[1])
    swallow = TcpProxy(broker_port, upstream_filter=partial(drop_mqtt_packets, PUBACK))
    await swallow.start()
    log = tmp_path / "service.log"
    env = fault_env(database_url, swallow.url, topic_prefix, tmp_path)
    sent = 0
    async with phone(mqtt_url, topic_prefix) as listener, publisher(mqtt_url) as device:
        async with running_service(env, log) as service:
            for _ in range(3):  # the same alarm reading three times
                await publish_readings(device, topic_prefix, "smoke-1", range(7, 8), alarm=True)
            for _ in range(2):  # and every bin reading twice
                await publish_readings(device, topic_prefix, "bin-1", range(READINGS), fill=5)
            sent = 3 + 2 * READINGS
            await settled(database_url, topic_prefix, listener, telemetry=READINGS + 1, cases=1)
            await wait_for(
                partial(service.metric, "gridwarden_ingest_duplicates_total"),
                lambda n: n == sent - READINGS - 1,
            )
            # Stored and committed, but the broker holds every message as unacknowledged.
            await service.kill()
        await swallow.stop()
        # Restarted straight at the broker: the resumed session redelivers all of them.
        direct = fault_env(database_url, mqtt_url, topic_prefix, tmp_path)
        async with running_service(direct, log) as service:
            redelivered = await wait_for(
                partial(service.metric, "gridwarden_ingest_duplicates_total"),
                lambda n: n >= sent,
            )
            received = await service.metric("gridwarden_ingest_received_total")
            after = await settled(database_url, topic_prefix, listener,
                                  telemetry=READINGS + 1, cases=1)  # fmt: skip
    assert (received, redelivered) == (sent, sent)  # every one a duplicate, none stored
    assert (after.telemetry, after.distinct_readings) == (READINGS + 1, READINGS + 1)
    assert after.alarms == {("smoke-1", "smoke.alarm"): 1}
    assert after.case_rows == 1
    assert len(after.cases["smoke-1"]["alarm_ids"]) == 1
    assert_one_notification_per_dispatch(after, listener, {"w-li": 1})
    raised = [n for n in listener.notes if n.payload.get("change") == "raised"]
    assert len({n.outbox_id for n in raised}) == 1
