"""`python -m bench`: measure a voice agent server from the client side, over real WebRTC.

    python -m bench --url http://127.0.0.1:8080            # a running server
    python -m bench --local                                # start one (embedded, loopback ICE), measure, stop
    python -m bench --url http://host:7860 --signaling plain   # another server (e.g. Pipecat SmallWebRTC)

Results go to bench/results/<timestamp>/: turns.json, summary.json, summary.md and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import report
from bench.harness import DEFAULT_OFFER_PATH, Transcribe, as_rows, run_sessions
from bench.process import process_usage
from bench.scenarios import EspeakVoice, Scenario, Voice, builtin, load_manifest
from realtime.webrtc import use_loopback_ice_only
from testkit.impair import Impairment
from testkit.local import local_server
from testkit.peer import BROWSER_PLAYOUT_FRAMES

STANDARD = "single,multi,pause,bargein,backchannel,noise,silence"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server")
    target.add_argument("--local", action="store_true", help="start a local server for the run")
    parser.add_argument("--profile", default="embedded", help="profile of the --local server (default embedded)")
    parser.add_argument("--scenarios", default=STANDARD, help=f"built-in scenarios at N=1 (default {STANDARD})")
    parser.add_argument("--manifest", type=Path, action="append", default=[], help="a scenario manifest (repeatable)")
    parser.add_argument("--sweep", default="1,2,4,8", help="simultaneous sessions to measure (default 1,2,4,8)")
    parser.add_argument("--sweep-scenarios", default="single", help="scenarios each session plays at N>1 (default single)")
    parser.add_argument("--transport", choices=("webrtc", "ws"), default="webrtc", help="WebRTC (default) or the /ws WebSocket")
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
    scenarios = builtin(Voice(), EspeakVoice())
    chosen: list[Scenario] = [scenarios[name] for name in args.scenarios.split(",") if name]
    chosen += [load_manifest(path) for path in args.manifest]
    swept = [scenarios[name] for name in args.sweep_scenarios.split(",") if name]
    transcribe = None if args.no_asr else transcriber()
    from tqdm import tqdm

    levels = [int(n) for n in args.sweep.split(",")]
    by_level: dict[int, dict[str, Any]] = {}
    for level in tqdm(levels, desc="concurrency levels", unit="level"):
        plays = chosen if level == 1 else swept
        before = process_usage(pid) if pid else None
        started = time.monotonic()
        results, totals = await run_sessions(
            url, plays, level, transcribe, args.offer_path, args.signaling == "ours", args.transport, args.playout_frames,
            args.impair,
        )
        run: dict[str, Any] = {"turns": as_rows(results), **totals.as_dict()}
        if args.impair:
            run["impairment"] = str(args.impair)
        if pid and before:
            cpu, rss = process_usage(pid)
            run["cpu_percent_per_session"] = round(100 * (cpu - before[0]) / (time.monotonic() - started) / level, 1)
            run["rss_mb"] = round(rss)
        by_level[level] = run
    return by_level


async def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    if args.local:
        async with local_server(args.profile) as (url, pid):
            by_level = await measure(args, url, pid)
    else:
        by_level = await measure(args, args.url, args.server_pid)
    print(report.write(by_level, out))
    print(f"results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
