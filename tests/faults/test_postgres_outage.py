"""PostgreSQL stopped for 60 s (`pg_ctl stop -m fast` of a private cluster: live
connections terminated, new ones refused) while devices keep publishing 48 MB.

The service stays up and takes at most its Receive Maximum from the broker (its memory
stays flat, the broker holds the rest); nothing is lost when the database returns; the
alarms raised during the outage become exactly one alarm and one case each; a case whose
accept deadline passed during the outage is escalated exactly once."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import pytest

from gridwarden.embedded import EmbeddedPostgres
from gridwarden.migrate import migrate
from tests.faults.harness import (
    PAD,
    assert_one_notification_per_dispatch,
    case_events,
    fault_env,
    phone,
    publish_readings,
    running_service,
    settled,
    setup_city,
    wait_heard,
)
from tests.ingest_helpers import fetchval, publish, publisher, wait_for

OUTAGE_S = 60.0
BATCH = 50  # Receive Maximum: 4 batches
WARM_UP = 200
DURING = 4000  # × 12 kB = 48 MB published while the database is down
MEMORY_BOUND_MB = 24.0  # half of what was published meanwhile


@pytest.mark.slow
async def test_a_60_s_database_outage_holds_memory_loses_nothing_and_counts_exactly(
    services_root, mqtt_url, topic_prefix, tmp_path
):
    postgres = EmbeddedPostgres(services_root / f"pg-{topic_prefix}")
    await asyncio.to_thread(postgres.start)
    try:
        database_url = postgres.dsn
        await migrate(database_url)
        await setup_city(database_url)
        env = fault_env(database_url, mqtt_url, topic_prefix, tmp_path,
                        GRIDWARDEN_BATCH_MAX_MESSAGES=str(BATCH),
                        GRIDWARDEN_SLA_CRITICAL_ACCEPT_S="15")  # fmt: skip
        count_sql = "SELECT count(*) FROM telemetry"
        async with (
            phone(mqtt_url, topic_prefix) as listener,
            publisher(mqtt_url) as device,
            running_service(env, tmp_path / "service.log") as service,
        ):
            await publish_readings(device, topic_prefix, "smoke-1", range(1, 2), alarm=True)
            await wait_heard(listener, "w-li")  # its accept deadline falls in the outage
            await publish_readings(device, topic_prefix, "bin-1", range(WARM_UP), fill=5, pad=PAD)
            await wait_for(lambda: fetchval(database_url, count_sql), lambda n: n == WARM_UP + 1)
            received = partial(service.metric, "gridwarden_ingest_received_total")
            baseline_mb, received_before = service.rss_mb(), await received()

            await asyncio.to_thread(postgres.stop)
            down_at = time.monotonic()

            async def keep_publishing() -> int:
                sent = 0
                for index, seq in enumerate(range(WARM_UP, WARM_UP + DURING)):
                    body = {"seq": seq, "fill": 5, "pad": PAD}
                    await publish(device, f"{topic_prefix}/dev/bin-1/telemetry", body)
                    sent += len(PAD)
                    if index == DURING // 4:  # two alarms, one on each lane
                        await publish_readings(device, topic_prefix, "cover-1", range(1, 2),
                                               tilt=30)  # fmt: skip
                        await publish(device, f"{topic_prefix}/dev/door-1/event",
                                      {"seq": 1, "event": "door_forced"})  # fmt: skip
                    # Spread over the first 45 s of the outage.
                    ahead = down_at + 45 * (index + 1) / DURING - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                return sent

            publishing = asyncio.create_task(keep_publishing())
            peak_mb, peak_received = baseline_mb, received_before
            while time.monotonic() - down_at < OUTAGE_S:
                assert service.alive(), service.log_tail()
                peak_mb = max(peak_mb, service.rss_mb())
                peak_received = max(peak_received, await received())
                await asyncio.sleep(0.5)
            published_bytes = await publishing
            print(f"outage: {published_bytes / 1e6:.0f} MB published; service RSS "
                  f"{baseline_mb:.0f} → {peak_mb:.0f} MB; took "
                  f"{peak_received - received_before:.0f} messages")  # fmt: skip
            await asyncio.to_thread(postgres.start)

            after = await settled(database_url, topic_prefix, listener,
                                  telemetry=WARM_UP + DURING + 2, cases=3, escalations=1,
                                  within_s=90)  # fmt: skip
            await asyncio.sleep(1.5)  # three more SLA ticks: a second escalation would show
            again = await settled(database_url, topic_prefix, listener,
                                  telemetry=WARM_UP + DURING + 2, cases=3)  # fmt: skip
            assert service.alive()
        overdue = again.cases["smoke-1"]
        overdue_events = await case_events(database_url, overdue["id"])
    finally:
        await asyncio.to_thread(postgres.stop)

    assert published_bytes >= 40e6
    # What the service took from the broker during the outage: its Receive Maximum (the
    # rest stayed in the broker), plus the two alarms on the event lane.
    assert peak_received - received_before <= 4 * BATCH + 2
    assert peak_mb - baseline_mb < MEMORY_BOUND_MB, (baseline_mb, peak_mb)
    assert again == after
    total = WARM_UP + DURING + 2
    assert (after.telemetry, after.distinct_readings, after.events) == (total, total, 1)
    assert after.alarms == {
        ("smoke-1", "smoke.alarm"): 1,
        ("cover-1", "manhole.tilted"): 1,
        ("door-1", "door.forced"): 1,
    }
    assert after.case_rows == 3
    assert all(len(case["alarm_ids"]) == 1 for case in after.cases.values())
    assert (overdue["escalations"], overdue["level"], overdue["assignee"]) == (
        1, "grid_leader", "lead-1")  # fmt: skip
    assert overdue_events.count("escalate") == 1
    assert_one_notification_per_dispatch(after, listener, {"w-li": 3, "lead-1": 1})
