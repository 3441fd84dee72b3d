"""The closed loop end to end, through `gridwarden up` as a real process: a smoke alarm
over MQTT → a case dispatched to the responsible worker → the notification on that
worker's topic → accept, arrive, resolve, verify, archive, rate through the API."""

from __future__ import annotations

import asyncio

import aiomqtt
import asyncpg
import httpx
import orjson

from gridwarden.auth import create_token
from gridwarden.mqtt_url import parse_mqtt_url
from tests.ingest_helpers import WAIT_S, publish, publisher
from tests.test_rules_integration import register
from tests.test_service_process import service_env, service_process

WORKERS = [
    # (id, name, role): both grid workers cover g1; w-busy already has an open case
    ("w-li", "李娜", "grid_worker"),
    ("w-busy", "王强", "grid_worker"),
    ("w-part", "赵敏", "part_time"),
    ("lead-1", "陈队长", "grid_leader"),
]


async def setup_city(database_url: str) -> dict[str, str]:
    await register(database_url, [("smoke-42", "smoke_detector", 300, "7号楼")])
    conn = await asyncpg.connect(database_url)
    try:
        for worker_id, name, role in WORKERS:
            await conn.execute(
                "INSERT INTO workers (id, name, role) VALUES ($1, $2, $3)", worker_id, name, role
            )
            await conn.execute(
                "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, 'g1')", worker_id
            )
        await conn.execute(
            "INSERT INTO cases (incident_key, origin, category, title, cell_id, state, priority,"
            " assignee, policy) VALUES ('other', 'report', 'x', 'x', 'g1', 'dispatched', 'minor',"
            ' \'w-busy\', \'{"accept": 1, "arrive": 1, "resolve": 1, "escalate": 1}\')'
        )
        return {
            "operator": await create_token(conn, "operator"),
            "w-li": await create_token(conn, "worker", "w-li"),
            "w-busy": await create_token(conn, "worker", "w-busy"),
        }
    finally:
        await conn.close()


async def test_smoke_alarm_to_archived_and_rated_case(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    tokens = await setup_city(database_url)
    env = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    endpoint = parse_mqtt_url(mqtt_url)
    async with (
        service_process(env) as (_, url),
        aiomqtt.Client(endpoint.host, endpoint.port, identifier=f"phone-{topic_prefix}") as phone,
        publisher(mqtt_url) as device,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await phone.subscribe(f"{topic_prefix}/workers/+/cases", qos=1)
        await publish(device, f"{topic_prefix}/dev/smoke-42/telemetry", {"seq": 1, "alarm": True})
        async with asyncio.timeout(WAIT_S):
            message = await anext(aiter(phone.messages))
        # The responsible on-duty grid worker with the fewest open cases: 李娜.
        assert message.topic.value == f"{topic_prefix}/workers/w-li/cases"
        note = orjson.loads(message.payload)
        assert (note["reason"], note["state"], note["priority"], note["cell_id"]) == (
            "dispatched", "dispatched", "critical", "g1")  # fmt: skip
        assert note["device_id"] == "smoke-42"
        case_id = note["case_id"]

        def as_(who: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tokens[who]}"}

        path = f"/api/cases/{case_id}"
        # Another worker can neither see nor act on it.
        assert (await http.get(path, headers=as_("w-busy"))).status_code == 403
        assert (await http.post(f"{path}/accept", headers=as_("w-busy"))).status_code == 403
        for action, body in [("accept", None), ("arrive", None),
                             ("resolve", {"note": "烟雾报警器误报，已清洁"})]:  # fmt: skip
            response = await http.post(f"{path}/{action}", json=body, headers=as_("w-li"))
            assert response.status_code == 200, response.text
        # The resolver may not verify their own work; an operator does.
        assert (await http.post(f"{path}/verify", headers=as_("w-li"))).status_code == 403
        for action, body in [("verify", None), ("archive", None),
                             ("rate", {"score": 5, "comment": "处置及时"})]:  # fmt: skip
            response = await http.post(f"{path}/{action}", json=body, headers=as_("operator"))
            assert response.status_code == 200, response.text
        case = (await http.get(path, headers=as_("operator"))).json()
        alarms = (await http.get("/api/alarms", headers=as_("operator"))).json()["items"]
    assert case["state"] == "archived"
    assert [(e["action"], e["who"]) for e in case["timeline"]][:5] == [
        ("reported", "system"), ("dispatched", "system"), ("accept", "w-li"),
        ("arrive", "w-li"), ("resolve", "w-li"),
    ]  # fmt: skip
    assert [e["action"] for e in case["timeline"]][5:] == ["verify", "archive", "rate"]
    assert case["rating"] == 5
    assert case["alarm_ids"] == [a["id"] for a in alarms]
    assert {a["state"] for a in alarms} == {"closed"}  # archiving closes the case's alarms
