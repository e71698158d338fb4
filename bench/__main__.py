"""`python -m bench`: measure a voice agent server from the client side, over real WebRTC.

    python -m bench --url http://127.0.0.1:8080            # a running server
    python -m bench --local                                # start one (embedded, loopback ICE), measure, stop
    python -m bench --url http://host:7860 --signaling plain   # another server (e.g. Pipecat SmallWebRTC)

Results go to bench/results/<timestamp>/: turns.json, summary.json, summary.md and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import report
from bench.harness import DEFAULT_OFFER_PATH, Transcribe, as_rows, run_sessions
from bench.machine import machine
from bench.process import cpu_by_stage, process_usage
from bench.scenarios import EspeakVoice, Scenario, Voice, builtin, load_manifest
from bench.unseen import UNSEEN, unseen
from realtime.webrtc import use_loopback_ice_only
from testkit.impair import Impairment
from testkit.room import RoomSpec
from testkit.local import local_server
from testkit.peer import BROWSER_PLAYOUT_FRAMES

STANDARD = "single,multi,pause,bargein,backchannel,noise,silence"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server")
    target.add_argument("--local", action="store_true", help="start a local server for the run")
    parser.add_argument("--profile", default="embedded", help="profile of the --local server (default embedded)")
    parser.add_argument(
        "--server-args", default="", help='more flags for the --local server, e.g. "--max-load off" (every call admitted, as before capacity)'
    )
    parser.add_argument(
        "--checkout", type=Path, help="run the --local server from this checkout of the project (e.g. a `git worktree` of an "
        "earlier commit): an A/B on one machine, one run after the other, with the same client"
    )
    parser.add_argument(
        "--scenarios",
        default=STANDARD,
        help=f"built-in scenarios at N=1 (default {STANDARD}); `unseen` stands for the speech the project was never "
        f"tuned on ({UNSEEN}: bench/unseen.py)",
    )
    parser.add_argument("--manifest", type=Path, action="append", default=[], help="a scenario manifest (repeatable)")
    parser.add_argument("--sweep", default="1,2,4,8", help="simultaneous sessions to measure (default 1,2,4,8)")
    parser.add_argument("--sweep-scenarios", default="single", help="scenarios each session plays at N>1 (default single)")
    parser.add_argument("--transport", choices=("webrtc", "ws", "twilio"), default="webrtc", help="WebRTC (default), the /ws "
                        "WebSocket, or a phone call as Twilio Media Streams carries one (8 kHz mu-law; measured from its audio)")
    parser.add_argument("--twilio-auth-token", default=secrets.token_hex(16), help="what --transport twilio signs with (--local: given to the server)")
    parser.add_argument("--offer-path", default=DEFAULT_OFFER_PATH, help=f"where to POST the offer (default {DEFAULT_OFFER_PATH})")
    parser.add_argument(
        "--signaling",
        choices=("ours", "plain"),
        default="ours",
        help="ours: this server (events, transcripts, stages); plain: any server answering an HTTP offer "
        "with {sdp, type} (e.g. Pipecat's SmallWebRTC), measured from its audio alone",
    )
    parser.add_argument(
        "--playout-frames",
        type=int,
        default=BROWSER_PLAYOUT_FRAMES,
        help=f"received frames the client holds before playing one (default {BROWSER_PLAYOUT_FRAMES}, a browser's "
        "30 ms measured by bench.experiments.browser_jitter; 4 is aiortc's own, as in runs before 2026-11-25)",
    )
    parser.add_argument(
        "--impair",
        type=Impairment.parse,
        help='a bad network for every call, e.g. "loss=10%%,delay=50ms,jitter=20ms,mtu=1280": each call\'s media '
        "and events go through a UDP relay on 127.0.0.1 that drops, delays, jitters and size-caps them both ways",
    )
    parser.add_argument(
        "--room",
        type=RoomSpec.parse,
        help='every call on a speakerphone, "DELAY_MS,LOSS_DB" (e.g. "150,0"): the agent audio each client plays '
        "comes back in its microphone that much later and quieter, through a synthetic room and a clipping speaker",
    )
    parser.add_argument("--server-pid", type=int, help="pid of the server, for its CPU and memory per session")
    parser.add_argument("--no-asr", action="store_true", help="skip transcribing the agent's audio")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def transcriber() -> Transcribe:
    from profiles.embedded import whisper_model_dir
    from runtime.workers import ModelWorker
    from streaming_tokenizer.whisper import WhisperEngine

    worker = ModelWorker("bench-asr")
    engine = worker.submit(WhisperEngine, whisper_model_dir(), 1, worker).result()
    return engine.transcribe


async def measure(args: argparse.Namespace, url: str, pid: int | None) -> dict[int, dict[str, Any]]:
    if urlparse(url).hostname in ("127.0.0.1", "localhost"):
        use_loopback_ice_only()  # aioice skips loopback addresses unless told; a local server needs them
    print("preparing scenarios ...", flush=True)
    names = [part for name in args.scenarios.split(",") if name for part in (UNSEEN.split(",") if name == "unseen" else [name])]
    scenarios = builtin(Voice(), EspeakVoice())
    if any(name.startswith("unseen-") for name in names + args.sweep_scenarios.split(",")):
        scenarios |= unseen()
    chosen: list[Scenario] = [scenarios[name] for name in names]
    chosen += [load_manifest(path) for path in args.manifest]
    swept = [scenarios[name] for name in args.sweep_scenarios.split(",") if name]
    transcribe = None if args.no_asr else transcriber()
    from tqdm import tqdm

    levels = [int(n) for n in args.sweep.split(",")]
    by_level: dict[int, dict[str, Any]] = {}
    for level in tqdm(levels, desc="concurrency levels", unit="level"):
        plays = chosen if level == 1 else swept
        before = process_usage(pid) if pid else None
        stages_before = cpu_by_stage(pid) if pid else {}
        started = time.monotonic()
        results, totals = await run_sessions(
            url, plays, level, transcribe, args.offer_path, args.signaling == "ours", args.transport, args.playout_frames,
            args.impair, args.room, args.twilio_auth_token,
        )
        run: dict[str, Any] = {"turns": as_rows(results), **totals.as_dict()}
        if args.impair:
            run["impairment"] = str(args.impair)
        if args.room:
            run["room"] = str(args.room)
        if pid and before:
            elapsed = time.monotonic() - started
            cpu, rss = process_usage(pid)
            run["cpu_percent_per_session"] = round(100 * (cpu - before[0]) / elapsed / level, 1)
            run["rss_mb"] = round(rss)
            run["cpu_by_stage"] = stage_cpu(stages_before, cpu_by_stage(pid), elapsed, run["turns"])
        by_level[level] = run
    return by_level


def stage_cpu(before: dict[str, float], after: dict[str, float], elapsed_s: float, turns: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each stage's CPU over a run: seconds per answered turn, and percent of one core."""
    answered = max(1, sum(turn["client_v2v_ms"] is not None for turn in turns))
    used = {stage: after[stage] - before.get(stage, 0.0) for stage in after}
    return {
        stage: {"s_per_turn": round(seconds / answered, 3), "percent_of_core": round(100 * seconds / elapsed_s, 1)}
        for stage, seconds in sorted(used.items(), key=lambda item: -item[1])
        if seconds >= 0.01
    }


async def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    where = machine()  # before the run: its load is the machine's own
    if args.local:
        phone = ("--twilio-auth-token", args.twilio_auth_token) if args.transport == "twilio" else ()
        async with local_server(args.profile, *shlex.split(args.server_args), *phone, checkout=args.checkout) as (url, pid):
            by_level = await measure(args, url, pid)
    else:
        by_level = await measure(args, args.url, args.server_pid)
    print(report.write(by_level, out, where))
    print(f"results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
