"""Browser end-to-end: headless Chromium with a fake microphone file presses Call on the real page."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from config import LoopbackConfig
from controller.loopback import LoopbackAgent
from realtime.events import ClientEvent
from realtime.session import SessionIO
from runtime.audio import SAMPLE_RATE
from testkit.browser import CHROMEDRIVER, CHROMIUM, chromium, speak_on_demand
from testkit.notifier import Notifier
from testkit.speech import espeak, write_wav
from tests.signals import envelope_alignment
from tests.test_proxy import _sessions, haproxy
from tests.test_worker import running_worker

pytestmark = pytest.mark.browser

ECHO_DELAY_MS = 4000
TEXT = "Hello there. This is the browser calling the voice agent server."


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()] + (
        [] if shutil.which("espeak-ng") else ["espeak-ng"]
    )
    if missing:  # `make test` installs them: a missing one is a broken setup, never a skip
        pytest.fail(f"browser test needs {missing} (apt-get install chromium chromium-driver espeak-ng)")


class TapAgent:
    """Keeps every input frame the server received, then hands it on to the real loopback agent."""

    def __init__(self, io: SessionIO) -> None:
        self.frames: list[np.ndarray] = []
        self.changed = Notifier()
        self._source = io.frames
        self._inner_io = dataclasses.replace(io, frames=asyncio.Queue())
        # The echo comes back after ECHO_DELAY_MS, so the first seconds at the server are the
        # microphone alone: the page's echo canceller (rightly) garbles mic audio that matches
        # what it is playing.
        self._inner = LoopbackAgent(self._inner_io, LoopbackConfig(delay_ms=ECHO_DELAY_MS))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._inner.run())
            group.create_task(self._tee())

    async def _tee(self) -> None:
        while True:
            frame = await self._source.get()
            self.frames.append(frame)
            self._inner_io.frames.put_nowait(frame)
            self.changed.notify()

    def on_client_event(self, event: ClientEvent) -> None:
        self._inner.on_client_event(event)


async def test_browser_call_reaches_the_server_and_hangs_up(start_server, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    speech = espeak(TEXT, 48000)
    fake_mic = tmp_path / "mic.wav"
    write_wav(fake_mic, speech, 48000)

    taps: list[TapAgent] = []

    def factory(io: SessionIO) -> TapAgent:
        taps.append(TapAgent(io))
        return taps[-1]

    server = await start_server(factory=factory, auth_token="s3cret")  # the page passes it on (the other test has none)
    driver = await asyncio.to_thread(chromium, fake_mic, tmp_path / "profile")
    try:
        def call() -> str:
            driver.get(server.url + "/#token=s3cret")
            driver.find_element(By.ID, "call").click()
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "connection").text == "connected")
            return driver.find_element(By.TAG_NAME, "body").get_attribute("data-session-id")

        session_id = await asyncio.to_thread(call)
        session = server.registry.get(session_id)
        assert session is not None and session.transport == "webrtc"

        # The fake microphone loops the file from wherever it is: find 3 s of what the server heard
        # (before any echo played) inside three passes of the file.
        tap = taps[0]
        await tap.changed.wait_for(lambda: len(tap.frames) >= 150, timeout=30)
        heard = np.concatenate(tap.frames[:150]).astype(np.float32) / 32768
        looped = np.tile(espeak(TEXT, SAMPLE_RATE), 3)
        score, _ = envelope_alignment(heard, looped, SAMPLE_RATE, hop_ms=20)
        assert score > 0.7, f"the server did not receive the file's audio (envelope correlation {score:.2f})"

        # The echo plays in the page: its agent meter moves.
        await asyncio.to_thread(
            lambda: WebDriverWait(driver, 20).until(
                lambda d: float(d.find_element(By.ID, "agent-level").get_attribute("value")) > 0.02
            )
        )
        await asyncio.to_thread(lambda: driver.find_element(By.ID, "hangup").click())
        await asyncio.wait_for(session.closed.wait(), 10)
        assert len(server.registry) == 0 and not session.tasks
        state = await asyncio.to_thread(lambda: driver.find_element(By.ID, "connection").text)
        assert state == "closed"
    finally:
        await asyncio.to_thread(driver.quit)


async def test_browser_conversation_with_the_embedded_models(start_server, embedded_models, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from config import AppConfig, ServerConfig
    from context.dialog import TranscriptStore
    from profiles import open_profile

    question = "What is the capital of France?"
    # Chromium loops the file: the long silence keeps the question from coming round again.
    speech = espeak(question, 48000)
    write_wav(tmp_path / "mic.wav", np.concatenate([np.zeros(24000), speech, np.zeros(48000 * 30)]), 48000)
    config = AppConfig(server=ServerConfig(data_dir=tmp_path / "data"), models=embedded_models.config)
    profile = await open_profile(config, TranscriptStore(tmp_path / "data"), models=embedded_models)
    server = await start_server(factory=profile.factory)
    driver = await asyncio.to_thread(chromium, tmp_path / "mic.wav", tmp_path / "profile")
    try:
        def conversation() -> tuple[str, str]:
            driver.get(server.url)
            driver.find_element(By.ID, "call").click()
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "profile").text == "embedded")
            user = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .turn.user:not(.partial)"))
            reply = wait.until(
                lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#transcript .turn.assistant") if e.text.strip()]
            )
            # The metrics row appears when the reply is done.
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#metrics tbody tr"))
            return user[0].text, reply[0].text

        user_text, reply_text = await asyncio.to_thread(conversation)
        from bench.metrics import word_error_rate

        assert word_error_rate(question, user_text) <= 0.2, user_text
        assert len(reply_text.split()) >= 2, reply_text
    finally:
        await asyncio.to_thread(driver.quit)


async def test_the_page_types_tunes_and_is_interrupted(start_server, embedded_models, tmp_path):
    """The page's own controls on a real conversation: turn settings through session.update, a typed
    message, a spoken barge-in that strikes through what was not heard; a screenshot of the end."""
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from config import AppConfig, ServerConfig
    from context.dialog import TranscriptStore
    from profiles import open_profile

    # The fake microphone is quiet; the barge-in is spoken into it once the reply has played 3.5 s
    # (over headphones, the server's canceller lets the user through from 3 s of the agent heard).
    write_wav(tmp_path / "mic.wav", np.zeros(48000 * 5), 48000)
    config = AppConfig(server=ServerConfig(data_dir=tmp_path / "data"), models=embedded_models.config)
    profile = await open_profile(config, TranscriptStore(tmp_path / "data"), models=embedded_models)
    server = await start_server(factory=profile.factory)
    driver = await asyncio.to_thread(chromium, tmp_path / "mic.wav", tmp_path / "profile")
    try:
        def settings_and_message() -> str:
            speak_on_demand(driver, espeak("Wait, stop please.", 48000), 48000)
            driver.get(server.url)
            # As with headphones: the fake microphone hears none of the agent, and the browser's echo
            # canceller would muffle speech over it.
            driver.find_element(By.ID, "aec").click()
            driver.find_element(By.ID, "call").click()
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "profile").text == "embedded")
            wait.until(lambda d: d.find_element(By.ID, "say-send").is_enabled())
            assert driver.find_element(By.ID, "echo-note").is_displayed()  # the server cancels instead
            driver.find_element(By.CSS_SELECTOR, "#settings-panel summary").click()
            Select(driver.find_element(By.NAME, "type")).select_by_value("vad")
            wait.until(lambda d: d.find_element(By.ID, "settings-state").text == "applied")
            commit = driver.find_element(By.NAME, "commit_ms")
            commit.clear()
            commit.send_keys("600\t")  # the change event fires on leaving the field
            wait.until(lambda d: d.find_element(By.ID, "settings-state").text == "applied")
            driver.find_element(By.ID, "say-text").send_keys("Tell me a long story about a brave knight and a dragon.")
            driver.find_element(By.ID, "say-send").click()
            return driver.find_element(By.TAG_NAME, "body").get_attribute("data-session-id")

        session_id = await asyncio.to_thread(settings_and_message)
        assert server.registry.get(session_id).echo.enabled  # the page said its browser does not cancel
        turn_config = server.registry.get(session_id).agent.config
        assert (turn_config.endpointing.type, turn_config.endpointing.commit_ms) == ("vad", 600)

        def interrupted() -> tuple[str, str, str]:
            wait = WebDriverWait(driver, 60)
            typed = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .turn.user.typed"))[0].text
            wait.until(lambda d: d.execute_script(
                "const p = call.playback; return p && p.audibleSince !== null && performance.now() - p.audibleSince > 3500"
            ))
            driver.execute_script("return speakNow()")
            cut = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .turn.assistant.interrupted .cut"))[0]
            heard = cut.find_element(By.XPATH, "../span[@class='heard']").text
            # Each turn's latency row has its stages as a stacked bar.
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#metrics tbody tr td.bar .stage.tts"))
            driver.save_screenshot(str(tmp_path / "conversation.png"))
            return typed, heard, cut.text

        typed, heard, cut = await asyncio.to_thread(interrupted)
        assert "brave knight" in typed
        assert cut.strip(), "nothing of the interrupted reply is marked as unheard"
        history = server.registry.get(session_id).agent.context.turns
        assistant = next(t for t in history if t.role == "assistant")
        assert assistant.status == "interrupted" and assistant.text == heard
        assert (tmp_path / "conversation.png").stat().st_size > 10_000
    finally:
        await asyncio.to_thread(driver.quit)


async def test_the_page_redials_a_dropped_call(start_server, tmp_path):
    """The server ends the call as it does when the network goes (media_timeout): the page calls
    again by itself, keeps the conversation shown, and can download both sessions' transcripts."""
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_wav(tmp_path / "mic.wav", espeak(TEXT, 48000), 48000)
    server = await start_server()
    driver = await asyncio.to_thread(chromium, tmp_path / "mic.wav", tmp_path / "profile")

    def session_id() -> str:
        return driver.find_element(By.TAG_NAME, "body").get_attribute("data-session-id") or ""

    try:
        def call() -> str:
            driver.get(server.url)
            driver.find_element(By.ID, "call").click()
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "connection").text == "connected")
            return session_id()

        first = await asyncio.to_thread(call)
        server.registry.get(first).request_close("media_timeout")
        second = await asyncio.to_thread(
            lambda: WebDriverWait(driver, 30).until(
                lambda d: session_id() not in ("", first) and d.find_element(By.ID, "connection").text == "connected" and session_id()
            )
        )
        assert server.registry.get(second) is not None and server.registry.get(first) is None
        ids = await asyncio.to_thread(lambda: driver.execute_script("return call.sessionIds"))
        assert ids == [first, second]
    finally:
        await asyncio.to_thread(driver.quit)


async def test_the_page_shows_a_tool_call_and_its_output(start_server, embedded_models, tmp_path):
    """A typed "What time is it?": the time tool's call and its output appear as a line of the
    transcript, between the question and the answer that says the time."""
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from config import AppConfig, ServerConfig
    from context.dialog import TranscriptStore
    from profiles import open_profile

    write_wav(tmp_path / "mic.wav", np.zeros(48000 * 30), 48000)
    config = AppConfig(server=ServerConfig(data_dir=tmp_path / "data"), models=embedded_models.config)
    profile = await open_profile(config, TranscriptStore(tmp_path / "data"), models=embedded_models)
    server = await start_server(factory=profile.factory)
    driver = await asyncio.to_thread(chromium, tmp_path / "mic.wav", tmp_path / "profile")
    try:
        def ask() -> list[tuple[str, str]]:
            driver.get(server.url)
            driver.find_element(By.ID, "call").click()
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "say-send").is_enabled())
            driver.find_element(By.ID, "say-text").send_keys("What time is it?")
            driver.find_element(By.ID, "say-send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .turn.tool .output"))
            wait.until(lambda d: "It's" in d.find_element(By.CSS_SELECTOR, "#transcript .turn.assistant").text)
            turns = driver.find_elements(By.CSS_SELECTOR, "#transcript .turn")
            return [(t.get_attribute("class"), t.text) for t in turns]

        turns = await asyncio.to_thread(ask)
    finally:
        await asyncio.to_thread(driver.quit)
    kinds = [classes.split()[1] for classes, _ in turns]
    assert kinds == ["user", "assistant", "tool"] or kinds == ["user", "tool", "assistant"], turns
    tool_line = next(text for classes, text in turns if "tool" in classes)
    assert tool_line.startswith("current_time({}) → {") and '"spoken": "It\'s' in tool_line, tool_line


async def test_the_page_redials_into_the_other_worker_when_its_worker_dies(tmp_path):
    """Headless Chromium on the page, through the proxy: its call's worker is killed (no goodbye,
    the media just stops); the page notices (its pings go unanswered), calls again by itself
    and is connected through the same address to the worker left."""
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_wav(tmp_path / "mic.wav", espeak("Hello, is anyone there?", 48000), 48000)
    async with (
        running_worker(tmp_path) as (process_a, a),
        running_worker(tmp_path) as (process_b, b),
        haproxy(a, b) as front,
    ):
        driver = await asyncio.to_thread(chromium, tmp_path / "mic.wav", tmp_path / "profile")

        def session_id() -> str:
            return driver.find_element(By.TAG_NAME, "body").get_attribute("data-session-id") or ""

        def connected_other_than(previous: str) -> str:
            return WebDriverWait(driver, 40).until(
                lambda d: session_id() not in ("", previous) and d.find_element(By.ID, "connection").text == "connected" and session_id()
            )

        try:
            await asyncio.to_thread(driver.get, front)
            await asyncio.to_thread(lambda: driver.find_element(By.ID, "call").click())
            first = await asyncio.to_thread(connected_other_than, "")
            (killed, other) = (process_a, b) if await _sessions(a) == 1 else (process_b, a)
            killed.send_signal(signal.SIGKILL)
            await killed.wait()
            second = await asyncio.to_thread(connected_other_than, first)
            assert await _sessions(other) == 1
            assert await asyncio.to_thread(lambda: driver.execute_script("return call.sessionIds")) == [first, second]
        finally:
            await asyncio.to_thread(driver.quit)
