"""Serve the embedded profile's LM (SmolLM2 in llama.cpp) over HTTP, OpenAI-compatible, for many
workers to share instead of each loading its own: `python run_lm_server.py --port 8081`, then each
worker with `--lm openai --lm-url http://HOST:8081/v1`. llama.cpp's own server does the work:
`--slots` conversations at once in one batch (continuous batching), each slot keeping its
conversation's prompt cached. Runs until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass, field

import structlog

from config import LM_WEIGHTS
from models.llamacpp_lm import llama_params
from profiles.embedded import smollm2_weights
from runtime.procfs import usable_cores


@dataclass(frozen=True)
class LMServerConfig:
    """Where the LM server listens and how much it serves at once."""

    host: str = "127.0.0.1"
    port: int = 8081
    slots: int = 8
    threads: int = field(default_factory=usable_cores)
    context_per_slot: int = 2048
    weights: str = "q4_0"


def parse(argv: list[str] | None) -> LMServerConfig:
    default = LMServerConfig()
    parser = argparse.ArgumentParser(prog="run_lm_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=default.host, help=f"address to listen on (default {default.host}; `0.0.0.0`: every interface)")
    parser.add_argument("--port", type=int, default=default.port, help=f"port (default {default.port})")
    parser.add_argument("--slots", type=int, default=default.slots, help=f"conversations generated at once (default {default.slots})")
    parser.add_argument("--threads", type=int, default=default.threads, help="compute threads (default: one per core)")
    parser.add_argument(
        "--context-per-slot", type=int, default=default.context_per_slot, help=f"tokens each slot holds (default {default.context_per_slot})"
    )
    parser.add_argument(
        "--lm-weights", dest="weights", choices=LM_WEIGHTS, default=default.weights,
        help=f"the weights' format, as the server's `--lm-weights` (default {default.weights})",
    )
    args = parser.parse_args(argv)
    if min(args.slots, args.threads, args.context_per_slot) < 1 or not 0 <= args.port <= 65535:
        parser.error("--slots, --threads and --context-per-slot must be positive, --port 0..65535")
    return LMServerConfig(args.host, args.port, args.slots, args.threads, args.context_per_slot, args.weights)


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    import xllamacpp

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    gguf = smollm2_weights(config.weights)
    params = llama_params(gguf, config.threads, config.slots, config.context_per_slot, False, config.host, config.port, http_threads=config.slots)
    server = xllamacpp.Server(params)
    structlog.get_logger().info("lm_server.listening", url=f"{server.listening_address}/v1", slots=config.slots, threads=config.threads)
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
