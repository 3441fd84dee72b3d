"""Simulated grid workers for the demo: they get their cases on their MQTT topic, like a
phone would, and work them through the HTTP API with their own worker tokens.

Most accept, walk over, fix and report back within their deadlines; some never
answer, so the case escalates to the grid leader (who then takes it); an operator
verifies, archives and rates what was resolved. Delays are in simulated seconds,
divided by `speedup`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiomqtt
import httpx
import orjson

from device_sim.fleet import _client, parse_mqtt_url

log = logging.getLogger(__name__)

IGNORE_SHARE = 0.25  # a quarter of first dispatches are never answered: they escalate
ACCEPT_DELAY_S = (30.0, 150.0)  # simulated seconds from the notification
WALK_S = (120.0, 480.0)  # to be on site
FIX_S = (300.0, 1200.0)  # to resolve
NOTES = ("已到现场处置完毕", "设备误报，已复位", "已通知物业清理", "井盖已复位加固", "已清运")


@dataclass
class CrewStats:
    notified: int = 0
    ignored: int = 0
    resolved: int = 0
    archived: int = 0
    errors: list[str] = field(default_factory=list)


async def run_crew(
    mqtt_url: str,
    api_url: str,
    worker_tokens: Mapping[str, str],
    operator_token: str,
    *,
    prefix: str = "gw",
    speedup: float = 1.0,
    seed: int = 7,
    stop: asyncio.Event,
) -> CrewStats:
    stats = CrewStats()
    rng = random.Random(seed)
    target = parse_mqtt_url(mqtt_url)
    tasks: set[asyncio.Task[None]] = set()

    async def pause(bounds: tuple[float, float]) -> None:
        await asyncio.sleep(rng.uniform(*bounds) / speedup)

    async def work(http: httpx.AsyncClient, worker_id: str, note: dict[str, object]) -> None:
        case = f"/api/cases/{note['case_id']}"
        mine = {"Authorization": f"Bearer {worker_tokens[worker_id]}"}
        boss = {"Authorization": f"Bearer {operator_token}"}
        try:
            await pause(ACCEPT_DELAY_S)
            steps: tuple[tuple[str, dict[str, str] | None, tuple[float, float]], ...] = (
                ("accept", None, WALK_S),
                ("arrive", None, FIX_S),
                ("resolve", {"note": rng.choice(NOTES)}, (5.0, 30.0)),
            )
            for action, body, delay in steps:
                if (
                    await http.post(f"{case}/{action}", json=body, headers=mine)
                ).status_code != 200:
                    return  # escalated or reassigned meanwhile: no longer this worker's
                await pause(delay)
            stats.resolved += 1
            review: tuple[tuple[str, dict[str, int] | None], ...] = (
                ("verify", None), ("archive", None), ("rate", {"score": rng.choice([3, 4, 5, 5])}),
            )  # fmt: skip
            for review_action, review_body in review:
                if (
                    await http.post(f"{case}/{review_action}", json=review_body, headers=boss)
                ).status_code != 200:
                    return
            stats.archived += 1
        except httpx.HTTPError as exc:
            stats.errors.append(repr(exc))

    async def listen(http: httpx.AsyncClient) -> None:
        while True:
            try:
                async with _client(target, f"gw-crew-{seed}") as client:
                    await client.subscribe(f"{prefix}/workers/+/cases", qos=1)
                    async for message in client.messages:
                        worker_id = message.topic.value.split("/")[-2]
                        note = orjson.loads(message.payload)
                        stats.notified += 1
                        if worker_id not in worker_tokens:
                            continue
                        if note.get("reason") == "dispatched" and rng.random() < IGNORE_SHARE:
                            stats.ignored += 1  # never answered: the SLA timer escalates it
                            continue
                        task = asyncio.create_task(work(http, worker_id, note))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            except aiomqtt.MqttError as exc:
                log.warning("crew: broker connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1)

    async with httpx.AsyncClient(base_url=api_url, timeout=10) as http:
        listener = asyncio.create_task(listen(http))
        await stop.wait()
        listener.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(listener, *tasks, return_exceptions=True)
    return stats
