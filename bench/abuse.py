"""`python -m bench.abuse`: bad messages of every class, over the data channel and the WebSocket,
while a well-behaved caller holds a conversation beside them.

    python -m bench.abuse --local                # a server started for the run (embedded profile)
    python -m bench.abuse --url http://127.0.0.1:8080 --cases 200

Each class's messages go to one abusive call per transport. A message must be answered by one
`error` event (a lucky one may be valid, and then has its effect); the abusive calls must stay up;
the well-behaved call must have all its replies, with no hole in its audio. Writes abuse.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import SessionRun
from bench.scenarios import Voice, builtin
from realtime.webrtc import use_loopback_ice_only
from realtime.wire import MAX_MESSAGE_BYTES
from testkit.local import local_server
from testkit.peer import ClientPeer
from testkit.ws_peer import WsPeer

Message = str | bytes
VALID_EVENTS: list[dict[str, Any]] = [
    {"type": "ping", "event_id": "p1"},
    {"type": "session.update", "session": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}},
    {"type": "response.cancel"},
    {"type": "playback.position", "position_ms": 120, "response_id": "resp_1"},
    {"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 2**63, rng.randint(-(10**9), 10**9)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, rng.random()])
    if kind == "str":
        return "".join(rng.choices(string.printable + "éß中\u202e\x00", k=rng.randint(0, 30)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_value(rng, 4) if rng.random() < 0.2 else rng.choice(["type", "session", "item", "x"]): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def mutated_event(rng: random.Random) -> Message:
    event = json.loads(json.dumps(rng.choice(VALID_EVENTS)))
    target = event
    while True:  # walk down to a random object inside it
        nested = [v for v in target.values() if isinstance(v, dict)]
        if not nested or rng.random() < 0.5:
            break
        target = rng.choice(nested)
    key = rng.choice(list(target))
    action = rng.choice(["drop", "retype", "extra", "rename"])
    if action == "drop":
        del target[key]
    elif action == "retype":
        target[key] = random_value(rng)
    elif action == "extra":
        target["".join(rng.choices(string.ascii_letters, k=6))] = random_value(rng)
    else:
        target[key + rng.choice(["_", "s", "."])] = target.pop(key)
    return json.dumps(event)


def deep_nesting(rng: random.Random) -> Message:
    depth = rng.choice([100, 1000, 20000])
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def huge_string(rng: random.Random) -> Message:
    size = rng.choice([MAX_MESSAGE_BYTES + 1, 10_000, 60_000])
    return json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", "text": "x" * size}]}})


def random_json(rng: random.Random) -> Message:
    return json.dumps(random_value(rng))


def not_json(rng: random.Random) -> Message:
    return "".join(rng.choices(string.printable, k=rng.randint(1, 200)))


def binary(rng: random.Random) -> Message:
    return rng.randbytes(rng.randint(1, 1000) * 2 + 1)  # odd: on /ws, not whole PCM samples either


CLASSES: dict[str, Callable[[random.Random], Message]] = {
    "random_json": random_json,
    "mutated_event": mutated_event,
    "deep_nesting": deep_nesting,
    "huge_string": huge_string,
    "not_json": not_json,
    "binary": binary,
}


@dataclass
class ClassResult:
    transport: str
    name: str
    sent: int = 0
    errors: int = 0  # `error` events that answered them
    accepted: int = 0  # no error: the message happened to be valid
    call_survived: bool = False


async def _send(peer: ClientPeer | WsPeer, message: Message) -> None:
    if isinstance(peer, ClientPeer):
        peer.send(message)
    else:
        await peer.send(message)


async def abuse(url: str, transport: str, name: str, cases: int, seed: int) -> ClassResult:
    """One call of `transport` that sends `cases` messages of class `name`, one at a time."""
    rng = random.Random(f"{seed}:{transport}:{name}")
    result = ClassResult(transport, name)
    peer: ClientPeer | WsPeer = ClientPeer(url, ping_interval_s=None) if transport == "webrtc" else WsPeer(url)
    try:
        await peer.connect()
        for _ in range(cases):
            message = CLASSES[name](rng)
            before = sum(1 for e in peer.events if e["type"] == "error")
            marker = f"after_{result.sent}"
            await _send(peer, message)
            # A ping after each message: its pong says the message before it was dealt with.
            await _send(peer, json.dumps({"type": "ping", "event_id": marker}))
            await peer.changed.wait_for(lambda: marker in peer.pongs, timeout=10)
            result.sent += 1
            errors = sum(1 for e in peer.events if e["type"] == "error") - before
            result.errors += errors
            result.accepted += errors == 0
        result.call_survived = not any(e["type"] == "session.closed" for e in peer.events)
    finally:
        await peer.close()
    return result


async def run(url: str, cases: int, seed: int) -> dict[str, Any]:
    """Every class on both transports, one after another, with one well-behaved call throughout."""
    scenario = builtin(Voice())["multi"]
    healthy = SessionRun(url, 0, None, "/api/offer", True, "webrtc")
    results: list[ClassResult] = []

    async def attack() -> None:
        await healthy.peer.changed.wait_for(lambda: healthy.peer.received, timeout=30)
        for transport in ("webrtc", "ws"):
            for name in CLASSES:
                results.append(await abuse(url, transport, name, cases, seed))

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(attack())
            group.create_task(healthy.play(scenario))
    finally:
        await healthy.close()
    turns = healthy.results
    return {
        "cases_per_class": cases,
        "seconds": round(time.monotonic() - started, 1),
        "classes": [asdict(r) for r in results],
        "healthy_call": {
            "turns": len(turns),
            "replies_heard": sum(t.client_v2v_ms is not None for t in turns),
            "underruns": healthy.underruns(),
            "client_v2v_ms": [t.client_v2v_ms for t in turns],
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["| transport | class | sent | error events | accepted as valid | call stayed up |", "|---|---|---|---|---|---|"]
    for r in report["classes"]:
        lines.append(f"| {r['transport']} | {r['name']} | {r['sent']} | {r['errors']} | {r['accepted']} | {r['call_survived']} |")
    h = report["healthy_call"]
    lines += ["", f"Beside them, a well-behaved call: {h['replies_heard']}/{h['turns']} replies heard, {h['underruns']} underruns."]
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server")
    target.add_argument("--local", action="store_true", help="start a local server (embedded profile) for the run")
    parser.add_argument("--cases", type=int, default=100, help="messages per class and transport (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    use_loopback_ice_only()
    out = args.out / time.strftime("abuse-%Y%m%d-%H%M%S")
    if args.local:
        async with local_server("embedded", "--max-load", "off") as (url, _):  # the fuzzing calls and the caller
            report = await run(url, args.cases, args.seed)
    else:
        report = await run(args.url, args.cases, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "abuse.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
