"""Hostile payloads over MQTT to `gridwarden up`: each one is exactly one dead letter with
a known reason, the readings around them are stored, and the service keeps running.

(The decoder's fuzzers are in test_fuzz_decode.py; this is the same input end to end,
through the writer and the database, where JSON nested deeper than 254 levels used to
stop the ingest: orjson reads it but cannot write it back.)"""

from __future__ import annotations

import orjson

from tests.faults.harness import KNOWN_REASONS, fault_env, running_service, setup_city
from tests.ingest_helpers import fetch, fetchval, publish, publisher, wait_for


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (channel and device, payload, the reason it is dead-lettered with)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("dev/bin-1/telemetry", b'{"fill": 5, "x": ' + nested(300) + b"}", "storage_rejected"),
    ("dev/bin-1/telemetry", b'{"fill": 5, "x": ' + nested(1000) + b"}", "storage_rejected"),
    ("dev/bin-1/telemetry", b'[{"fill": 500, "x": ' + nested(300) + b"}]", "storage_rejected"),
    (
        "dev/door-1/event",
        b'{"event": "door_opened", "x": ' + nested(300) + b"}",
        "storage_rejected",
    ),
    ("dev/bin-1/telemetry", nested(1100), "not_json"),  # beyond what orjson reads
    ("dev/bin-1/telemetry", b'{"fill": 5, "note": "' + b"a" * 1_000_000 + b'"}', "oversized"),
    ("dev/bin-1/telemetry", b'{"fill": NaN}', "not_json"),
    ("dev/bin-1/telemetry", b'{"fill": Infinity}', "not_json"),
    ("dev/bin-1/telemetry", b'{"fill": 1e400}', "not_json"),
    ("dev/bin-1/telemetry", b'{"fill": 18446744073709551616}', "out_of_range"),
    ("dev/bin-1/telemetry", b'{"seq": 18446744073709551615}', "out_of_range"),
    ("dev/bin-1/telemetry", b'{"ts": 1e300}', "bad_timestamp"),
    ("dev/bin-1/telemetry", b'{"fill": 5, "s": "a\\u0000b"}', "wrong_type"),
    ("dev/bin-1/telemetry", b'{"fill": 5, "s": "\\ud800"}', "not_json"),
    ("dev/bin-1/telemetry", b'{"fill": "5"}', "wrong_type"),
    ("dev/smoke-1/telemetry", b'{"alarm": 1}', "wrong_type"),
    ("dev/bin-1/telemetry", b"\xff\xfe{}", "not_utf8"),
    ("dev/bin-1/telemetry", b'{"fill": 5, "\x00": 1}', "not_json"),
    ("codec/chirpstack/bin-1", b'{"object": ' + nested(300) + b"}", "codec_error"),
]


async def test_hostile_payloads_are_dead_letters_and_the_stream_goes_on(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    await setup_city(database_url)
    env = fault_env(database_url, mqtt_url, topic_prefix, tmp_path)
    good = 0
    async with (
        publisher(mqtt_url) as device,
        running_service(env, tmp_path / "service.log") as service,
    ):
        for index, (where, payload, _) in enumerate(HOSTILE):
            await publish(device, f"{topic_prefix}/{where}", payload)
            reading = {"seq": index, "fill": 5, "x": orjson.Fragment(nested(200))}
            await publish(device, f"{topic_prefix}/dev/bin-1/telemetry", reading)
            good += 1
        await publish(device, f"{topic_prefix}/dev/bin-1/telemetry", {"seq": 2**63 - 1})
        good += 1
        await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM dead_letters"),
            lambda n: n >= len(HOSTILE),
        )
        await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"), lambda n: n >= good
        )
        assert service.alive()
    letters = await fetch(database_url, "SELECT topic, reason FROM dead_letters ORDER BY id")
    assert {r["reason"] for r in letters} <= KNOWN_REASONS
    assert sorted((r["topic"].split("/", 1)[1], r["reason"]) for r in letters) == sorted(
        (where, reason) for where, _, reason in HOSTILE
    )
    assert await fetchval(database_url, "SELECT count(*) FROM telemetry") == good
