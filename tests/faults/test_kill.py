"""`kill -9` of `gridwarden up` mid-stream, with a case whose accept deadline passes while
the service is dead: every reading stored once, one alarm and one case per incident, the
overdue case escalated exactly once after the restart, one notification per dispatch."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.harness import (
    assert_one_notification_per_dispatch,
    case_events,
    fault_env,
    phone,
    publish_readings,
    running_service,
    settled,
    setup_city,
    tally,
    wait_heard,
    wait_until_past,
)
from tests.ingest_helpers import WAIT_S, fetchval, publish, publisher, wait_for

STREAM = 1000


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_nothing_and_escalates_the_overdue_case_once(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    await setup_city(database_url)
    env = fault_env(database_url, mqtt_url, topic_prefix, tmp_path,
                    GRIDWARDEN_SLA_CRITICAL_ACCEPT_S="6")  # fmt: skip
    log = tmp_path / "service.log"
    count_sql = "SELECT count(*) FROM telemetry"
    async with phone(mqtt_url, topic_prefix) as listener, publisher(mqtt_url) as device:

        async def stream() -> None:
            for seq in range(STREAM):
                await publish(
                    device, f"{topic_prefix}/dev/bin-1/telemetry", {"seq": seq, "fill": 5}
                )
                if seq == STREAM // 2:  # an alarm in the middle, before or after the kill
                    await publish(device, f"{topic_prefix}/dev/cover-1/telemetry",
                                  {"seq": 1, "tilt": 30})  # fmt: skip
                if seq % 50 == 0:
                    await asyncio.sleep(0.02)  # a stream, not one burst

        async with running_service(env, log) as service:
            await publish_readings(device, topic_prefix, "smoke-1", range(1, 2), alarm=True)
            await wait_heard(listener, "w-li")
            first = (await tally(database_url, topic_prefix)).cases["smoke-1"]
            streaming = asyncio.create_task(stream())
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n >= 200,
                           within_s=WAIT_S * 2)  # fmt: skip
            await service.kill()  # SIGKILL mid-stream
        stored_at_kill = await fetchval(database_url, count_sql)
        async with asyncio.timeout(WAIT_S * 2):
            await streaming  # the rest is published while the service is down
        await wait_until_past(database_url, first["id"])  # its accept deadline passes now
        async with running_service(env, log) as service:
            await settled(database_url, topic_prefix, listener, telemetry=STREAM + 2, cases=2,
                          escalations=1)  # fmt: skip
            await asyncio.sleep(1.5)  # three more SLA ticks: a second escalation would show
            after = await tally(database_url, topic_prefix)
            duplicates = await service.metric("gridwarden_ingest_duplicates_total")
    assert stored_at_kill < STREAM
    assert (after.telemetry, after.distinct_readings) == (STREAM + 2, STREAM + 2), duplicates
    assert after.alarms == {("smoke-1", "smoke.alarm"): 1, ("cover-1", "manhole.tilted"): 1}
    assert after.case_rows == 2
    overdue, other = after.cases["smoke-1"], after.cases["cover-1"]
    assert (overdue["escalations"], overdue["level"], overdue["assignee"]) == (
        1, "grid_leader", "lead-1")  # fmt: skip
    assert (await case_events(database_url, overdue["id"])).count("escalate") == 1
    assert (other["escalations"], other["assignee"]) == (0, "w-li")
    assert len(overdue["alarm_ids"]) == len(other["alarm_ids"]) == 1
    assert_one_notification_per_dispatch(after, listener, {"w-li": 2, "lead-1": 1})
    escalated = next(iter(listener.cases("lead-1").values())).payload
    assert (escalated["reason"], escalated["case_id"]) == ("escalated", overdue["id"])
