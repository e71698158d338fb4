"""`python -m bench.experiments.browser_jitter`: how long a browser holds received agent audio before playing it.

Headless Chromium calls a local loopback-profile server from the real page, and its WebRTC stats
(`inbound-rtp` audio: jitterBufferDelay / jitterBufferEmittedCount) give the mean time a sample
waited in its jitter buffer. The harness's client holds as many frames (`--playout-frames`), so
that client_v2v counts the playout delay a browser user has, not aiortc's own 80 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from testkit.browser import chromium
from testkit.local import local_server
from testkit.speech import espeak, write_wav

STATS = """
const done = arguments[arguments.length - 1];
call.pc.getStats().then((report) => {
  const audio = [];
  report.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "audio") audio.push(s); });
  done(JSON.stringify(audio));
});
"""


def measure(url: str, seconds: float, workdir: Path) -> list[float]:
    """Mean jitter-buffer delay in ms, read every 5 s of a `seconds` long call."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    mic = workdir / "mic.wav"
    write_wav(mic, espeak("This is the browser talking to the server, to keep its audio flowing.", 48000), 48000)
    driver = chromium(mic, workdir / "profile")
    means = []
    try:
        driver.get(url)
        driver.find_element(By.ID, "call").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "connection").text == "connected")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(5)  # a sampling interval of a running call, not waiting for an event
            for stats in json.loads(driver.execute_async_script(STATS)):
                emitted = stats.get("jitterBufferEmittedCount") or 0
                if emitted:
                    means.append(1000.0 * stats["jitterBufferDelay"] / emitted)
    finally:
        driver.quit()
    return means


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.browser_jitter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the call (default 15)")
    args = parser.parse_args()
    async with local_server("loopback") as (url, _):
        with tempfile.TemporaryDirectory() as workdir:
            means = await asyncio.to_thread(measure, url, args.seconds, Path(workdir))
    if not means:
        raise SystemExit("Chromium reported no received audio")
    print("jitter buffer delay, mean so far (ms): " + ", ".join(f"{m:.1f}" for m in means))
    print(f"a browser holds about {means[-1] / 20:.1f} frames of 20 ms")


if __name__ == "__main__":
    asyncio.run(main())
