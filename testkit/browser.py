"""Headless Chromium with a fake microphone file, driven through chromedriver (the Debian
packages chromium and chromium-driver): the browser end-to-end tests' client, and the harness's
measure of a browser's playout delay."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium(fake_mic: Path, profile_dir: Path) -> Any:
    """A headless Chromium whose microphone plays `fake_mic` (a WAV file) in a loop."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}", "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# Wraps the page's microphone: what the fake device plays, plus `window.speakNow()`, which plays the
# words given when called and resolves when they end. Speech placed by an event of the call, not
# by a fixed time in the microphone's file (a slower machine answers later).
_SPEAK_ON_DEMAND = """
(() => {
  const bytes = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer);  // 16-bit, as a WAV file holds it  // 16-bit, as a WAV file holds it
  const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const device = await open(constraints);
    const context = new AudioContext({ sampleRate: %d });
    const mixed = context.createMediaStreamDestination();
    context.createMediaStreamSource(device).connect(mixed);
    window.speakNow = () => {
      const buffer = context.createBuffer(1, pcm.length, context.sampleRate);
      buffer.getChannelData(0).set(Float32Array.from(pcm, (s) => s / 32768));
      const node = context.createBufferSource();
      node.buffer = buffer;
      node.connect(mixed);
      node.start();
      return new Promise((resolve) => { node.onended = () => resolve(); });
    };
    return mixed.stream;
  };
})();
"""


def speak_on_demand(driver: Any, speech: np.ndarray, sample_rate: int) -> None:
    """Pages opened from now on by `driver` can be made to say `speech` (float, -1 to 1) into their
    microphone at a moment of the test's choosing: `driver.execute_script("return speakNow()")`."""
    pcm = base64.b64encode((np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()).decode()
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _SPEAK_ON_DEMAND % (pcm, sample_rate)})
