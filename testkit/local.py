"""A server of this project started for one measurement: a subprocess on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def local_server(profile: str, *args: str, checkout: Path | None = None) -> AsyncIterator[tuple[str, int]]:
    """The server's URL and pid; `args` are more command-line flags; `checkout`: another checkout
    of this project to run it from (an earlier commit, for an A/B), else this directory's."""
    port = free_port()
    command = [
        sys.executable, "run_server.py", "--port", str(port), "--loopback-ice", "--profile", profile, "--max-sessions", "32",
        # One client address opens every call of a run, many at once and again and again.
        "--pending-offers-per-address", "32", "--offers-per-minute", "1000", *args
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=checkout)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # up to 5 minutes of model loading (a few seconds here)
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read() if server.stderr else ''}")
                try:
                    async with http.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)  # polling a process that reports nothing else
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
