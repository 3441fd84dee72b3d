"""Privacy proofs: card numbers and worker phone numbers are never in clear in the
database nor in the service's logs.

Door events with `credential` card numbers go in through MQTT and the real ingest path
(native events, the Hikvision codec, and the odd places a card number can turn up: on
a telemetry message, on another kind's event); the sample city's workers (with phone
numbers, one in an international, punctuated form) are imported through
`import_file`, what `gridwarden import` runs. Then every text, json(b), bytea and array
column of every table is scanned for the clear values, and so are the DEBUG logs. The
one exception is `dead_letters.payload`, which keeps the raw bytes of rejected input by
contract: a rejected door event keeps its card number there (asserted below, so a change
of that contract is noticed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import asyncpg
import orjson
import pytest

from gridwarden.mqtt_url import parse_mqtt_url
from gridwarden.registry import RegistryError, import_file, normalize_phone
from gridwarden.sample_city import build_sample_city, write_sample_city
from tests.ingest_helpers import fetchval, running_ingest, settings_for, wait_for
from tests.test_codecs import HIK_CARD, patched

HASH_KEY = "privacy-test-key"
PUBLISHER_LOGGER = "tests.privacy.publisher"  # the test's own client: not the service
INTERNATIONAL_PHONE = "+86 139-0011-2233"  # stored (hashed) as 13900112233

CARD_EVENT = "CARD-7731-0042"  # a door event on gw/dev/{id}/event
CARD_HIKVISION = "6225880137706868"  # an ISAPI AccessControllerEvent cardNo
CARD_TELEMETRY = "CARD-5512-TELEMETRY"  # a credential on a door's telemetry
CARD_OTHER_KIND = "CARD-9091-SMOKE"  # a credential on a smoke detector's event
CARD_DEAD = "CARD-4410-DEAD"  # a door event rejected (bad timestamp)
CARD_LONG = "CARD-LONG-" + "7" * 250  # rejected: a credential longer than 256
CARD_NUMBER = 6225880137701111  # rejected: a card number sent as a JSON number
DEAD_CARDS = (CARD_DEAD, CARD_LONG, str(CARD_NUMBER))
CARDS = (CARD_EVENT, CARD_HIKVISION, CARD_TELEMETRY, CARD_OTHER_KIND, *DEAD_CARDS)

SCANNED_TYPES = ("text", "character varying", "character", "json", "jsonb", "bytea", "ARRAY")
RAW_BY_CONTRACT = {("dead_letters", "payload")}


async def columns(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
    """(table, column, type) of every column of every table that can hold text."""
    rows = await conn.fetch(
        """SELECT c.table_name, c.column_name, c.data_type
           FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
           WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
             AND c.data_type = ANY($1::text[])
           ORDER BY 1, 2""",
        list(SCANNED_TYPES),
    )
    return [(r["table_name"], r["column_name"], r["data_type"]) for r in rows]


async def places_holding(conn: asyncpg.Connection, needle: str) -> set[tuple[str, str]]:
    """Every (table, column) where some row holds `needle` (bytea: as UTF-8 bytes)."""
    found = set()
    for table, column, data_type in await columns(conn):
        if data_type == "bytea":
            condition = f"position(convert_to($1, 'UTF8') in \"{column}\") > 0"
        else:
            condition = f'strpos("{column}"::text, $1) > 0'
        if await conn.fetchval(
            f'SELECT EXISTS (SELECT 1 FROM "{table}" WHERE {condition})', needle
        ):
            found.add((table, column))
    return found


@asynccontextmanager
async def publisher(mqtt_url: str) -> AsyncIterator[aiomqtt.Client]:
    endpoint = parse_mqtt_url(mqtt_url)
    async with aiomqtt.Client(
        endpoint.host, endpoint.port, identifier=f"pub-{uuid.uuid4().hex[:8]}",
        logger=logging.getLogger(PUBLISHER_LOGGER),
    ) as client:  # fmt: skip
        yield client


def phones_of(workers: list[dict[str, object]]) -> set[str]:
    """Each phone as written in the file and as normalised (what would be hashed)."""
    raw = {str(w["phone"]) for w in workers if w.get("phone")}
    return raw | {normalize_phone(p) for p in raw}


@pytest.fixture
def city_files(tmp_path: Path) -> tuple[Path, Path, Path, list[dict[str, object]]]:
    files = write_sample_city(tmp_path)
    workers = build_sample_city().workers
    workers[0] = {**workers[0], "phone": INTERNATIONAL_PHONE}
    files.workers.write_text(json.dumps(workers, ensure_ascii=False), "utf-8")
    return files.grid, files.devices, files.workers, workers


async def test_no_card_or_phone_number_in_clear_in_the_database_or_the_logs(
    database_url, mqtt_url, topic_prefix, city_files, caplog
):
    caplog.set_level(logging.DEBUG)
    grid, devices, workers_file, workers = city_files
    city = build_sample_city()
    door = next(d["id"] for d in city.devices if d["kind"] == "door_access")
    smoke = next(d["id"] for d in city.devices if d["kind"] == "smoke_detector")
    settings = settings_for(database_url, mqtt_url, topic_prefix, credential_hash_key=HASH_KEY)

    conn = await asyncpg.connect(database_url)
    try:
        for kind, path in (("grid", grid), ("devices", devices), ("workers", workers_file)):
            await import_file(conn, kind, path, settings)
        await import_file(conn, "workers", workers_file, settings)  # again: nothing changes
    finally:
        await conn.close()

    p = topic_prefix
    hikvision = patched(HIK_CARD, {"AccessControllerEvent.cardNo": CARD_HIKVISION})
    messages = [
        (f"{p}/dev/{door}/event", {"seq": 1, "event": "access_denied", "credential": CARD_EVENT}),
        (f"{p}/codec/hikvision/{door}", hikvision),
        (f"{p}/dev/{door}/telemetry", {"seq": 3, "door_open": True, "credential": CARD_TELEMETRY}),
        (f"{p}/dev/{smoke}/event", {"seq": 1, "event": "test", "credential": CARD_OTHER_KIND}),
        (f"{p}/dev/{door}/event",
         {"seq": 5, "event": "access_granted", "credential": CARD_DEAD, "ts": "yesterday"}),
        (f"{p}/dev/{door}/event", {"seq": 6, "event": "access_denied", "credential": CARD_LONG}),
        (f"{p}/dev/{door}/event", {"seq": 7, "event": "access_denied", "credential": CARD_NUMBER}),
    ]  # fmt: skip
    async with running_ingest(settings), publisher(mqtt_url) as client:
        for topic, payload in messages:
            await client.publish(topic, orjson.dumps(payload), qos=1)
        counts = (
            "SELECT ROW((SELECT count(*) FROM device_events), "
            "(SELECT count(*) FROM telemetry), (SELECT count(*) FROM dead_letters))::text"
        )
        await wait_for(lambda: fetchval(database_url, counts), lambda row: row == "(3,1,3)")

    conn = await asyncpg.connect(database_url)
    try:
        # The scan sees what is there: a worker's name, and the raw rejected bytes.
        assert ("workers", "name") in await places_holding(conn, str(workers[1]["name"]))
        for card in DEAD_CARDS:  # only the raw bytes keep a rejected card, by contract
            assert await places_holding(conn, card) == RAW_BY_CONTRACT, card
        reasons = await conn.fetch("SELECT reason, detail FROM dead_letters ORDER BY id")
        assert sorted(r["reason"] for r in reasons) == ["bad_timestamp", "out_of_range",
                                                         "wrong_type"]  # fmt: skip
        leaks = {}
        for secret in (*CARDS, *phones_of(workers)):
            if found := await places_holding(conn, secret) - RAW_BY_CONTRACT:
                leaks[secret] = found
        assert leaks == {}
        # What is kept instead: keyed hashes (and the masked phone).
        key = HASH_KEY.encode()
        hashes = {r["credential_hash"] for r in await conn.fetch("SELECT * FROM device_events")}
        assert hashes == {
            hmac.new(key, card.encode(), hashlib.sha256).hexdigest()
            for card in (CARD_EVENT, CARD_HIKVISION, CARD_OTHER_KIND)
        }
        first = await conn.fetchrow(
            "SELECT phone_hash, phone_masked FROM workers WHERE id = $1", workers[0]["id"]
        )
        assert first["phone_hash"] == hmac.new(key, b"13900112233", hashlib.sha256).hexdigest()
        assert first["phone_masked"] == "139****2233"
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 4  # the imports
    finally:
        await conn.close()

    service_logs = [r for r in caplog.records if not r.name.startswith(PUBLISHER_LOGGER)]
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG was captured
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in service_logs
    )
    for secret in (*CARDS, *phones_of(workers)):
        assert secret not in text, secret


async def test_a_rejected_workers_file_names_no_phone_number(database_url, city_files, caplog):
    """A bad phone is a problem of the import, reported without the number; the rejected
    import is audited with its number of problems only."""
    caplog.set_level(logging.DEBUG)
    grid, _, workers_file, workers = city_files
    bad_phone = "138-0013-800X"
    rejected = [{**workers[0], "phone": bad_phone}, *workers[1:]]
    workers_file.write_text(json.dumps(rejected, ensure_ascii=False), "utf-8")
    settings = settings_for(database_url, "mqtt://unused", "t", credential_hash_key=HASH_KEY)
    conn = await asyncpg.connect(database_url)
    try:
        await import_file(conn, "grid", grid, settings)
        with pytest.raises(RegistryError) as raised:
            await import_file(conn, "workers", workers_file, settings)
        assert "phone" in str(raised.value)
        for secret in (bad_phone, *phones_of(workers)):
            assert secret not in str(raised.value)
            assert await places_holding(conn, secret) == set(), secret
        detail = await conn.fetchval(
            "SELECT detail FROM audit_log WHERE action = 'registry.import_rejected'"
        )
        assert orjson.loads(detail) == {"file": str(workers_file), "problems": 1}
    finally:
        await conn.close()
    assert bad_phone not in caplog.text
