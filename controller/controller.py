"""The per-session Controller: Step-Audio's turn-taking state machine with speculative responses.

LISTENING -> USER_SPEAKING -> USER_PAUSED -> RESPONDING -> LISTENING. At a pause the reply is
prepared speculatively (transcript, LM, speech into a buffer, nothing played); speech resuming
cancels it; the commit plays the buffer at once. Confirmed user speech while RESPONDING is a
barge-in: the output is flushed, the reply's tasks are cancelled and the history keeps only what
the user heard.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from contextlib import aclosing
from typing import Any, AsyncGenerator, Coroutine

import numpy as np
import structlog

from config import TurnConfig
from context.dialog import DialogContext, Turn, heard_text
from models.base import LanguageModel, SpeechChunk, SpeechDecoder
from realtime.events import ClientEvent, error_event
from realtime.session import SessionIO
from streaming_tokenizer.base import PartialCallback, StreamingTokenizer, UtteranceInput
from vad.endpointer import FRAME_MS, Endpoint, Endpointer, Kind
from vad.engines import SpeechDetector

log = structlog.get_logger()


class State(enum.StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    USER_PAUSED = "user_paused"
    RESPONDING = "responding"


@dataclass
class SessionModels:
    """The model handles one session uses (each holds that session's state, if any)."""

    detector: SpeechDetector
    tokenizer: StreamingTokenizer
    lm: LanguageModel
    decoder: SpeechDecoder


@dataclass
class Counters:
    speculative_starts: int = 0
    speculative_commits: int = 0
    speculative_cancels: int = 0
    responses: int = 0
    bargeins: int = 0
    late_resumes: int = 0  # speech right after a commit, before its transcript: one utterance continued


@dataclass
class Response:
    """One reply in flight: its task, what waits for the commit, and what has gone out."""

    id: str
    item_id: str
    speculative: bool
    preset: UtteranceInput | None = None  # a typed user message: no transcription needed
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    transcriber: asyncio.Task[None] | None = None  # a transcript made beside the reply
    user: UtteranceInput | None = None
    user_recorded: bool = False
    held_assistant: Turn | None = None  # the reply's turn, waiting for the user's turn before it
    text: str = ""
    pending_deltas: list[str] = field(default_factory=list)
    pending_chunks: list[SpeechChunk] = field(default_factory=list)
    played: list[tuple[str, float]] = field(default_factory=list)  # (text, ms) written to the output
    audio_base: int = 0  # output.audio_frames_sent at the commit: every audio frame after it is ours
    client_position_ms: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


class Controller:
    """Owns one session's turn-taking: the endpointer, the dialog context, the reply tasks."""

    def __init__(
        self,
        io: SessionIO,
        models: SessionModels,
        context: DialogContext,
        config: TurnConfig,
        profile: str,
    ) -> None:
        self.io = io
        self.models = models
        self.context = context
        self.config = config
        self.profile = profile
        self.endpointer = Endpointer(config)
        self.state = State.LISTENING
        self.counters = Counters()
        self.response: Response | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._item_id = ""
        self._turns = itertools.count(1)
        self._last_voiced_at = 0.0
        self._frame_index = -1
        self.log = log.bind(session_id=io.session_id)

    # ---- the frame loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.io.emit({"type": "session.created", "session": self._session_info()})
        self._emit_state()
        try:
            while True:
                self.on_frame(await self.io.frames.get())
        finally:
            await self._shutdown()

    def on_frame(self, frame: np.ndarray) -> None:
        self._frame_index += 1
        probability = self.models.detector.probability(frame)
        endpoint = self.endpointer.feed(frame, probability)
        voiced = self.endpointer.last_voiced_index == self._frame_index
        if voiced:
            self._last_voiced_at = time.monotonic()
        if endpoint is not None and endpoint.kind == Kind.SPEECH_STARTED:
            self._on_speech_started(endpoint)
        elif self.state in (State.USER_SPEAKING, State.USER_PAUSED):
            self.models.tokenizer.feed(frame, voiced)
        if endpoint is None or endpoint.kind == Kind.SPEECH_STARTED:
            return
        if endpoint.kind == Kind.PAUSED:
            self._set_state(State.USER_PAUSED)
            self._start_response(speculative=True)
        elif endpoint.kind == Kind.RESUMED:
            self._set_state(State.USER_SPEAKING)
            self._cancel_speculation()
        elif endpoint.kind == Kind.COMMITTED:
            self._on_commit(endpoint)

    # ---- transitions ----------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.endpointer.min_speech_ms = (
                self.config.bargein_min_speech_ms if state == State.RESPONDING else self.config.min_speech_ms
            )
            self._emit_state()

    def _emit_state(self) -> None:
        self.io.emit({"type": "session.state", "state": self.state.value})

    def _on_speech_started(self, endpoint: Endpoint) -> None:
        continuing = False
        if self.state == State.RESPONDING:
            response = self.response
            # Speech before the committed utterance was even tokenized means the commit came too
            # early: keep one utterance (and one user turn) rather than splitting the user's words.
            # (A transcript made beside the reply does not count: the reply was already under way.)
            continuing = response is not None and response.preset is None and response.user is None
            self._interrupt("interrupted")
            if continuing:
                self.counters.late_resumes += 1
            else:
                self.counters.bargeins += 1
        if continuing:
            for frame in endpoint.audio:
                self.models.tokenizer.feed(frame, True)
        else:
            self._item_id = "item_" + uuid.uuid4().hex[:12]
            self.models.tokenizer.begin(endpoint.audio, self._partial_emitter(self._item_id))
        self._set_state(State.USER_SPEAKING)
        onset_ms = (endpoint.frame_index + 1 - len(endpoint.audio)) * FRAME_MS
        self.io.emit(
            {"type": "input_audio_buffer.speech_started", "item_id": self._item_id, "audio_start_ms": onset_ms}
        )

    def _partial_emitter(self, item_id: str) -> PartialCallback:
        def emit(partial: UtteranceInput) -> None:
            if self._item_id == item_id:  # each partial replaces the one before
                self.io.emit(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item_id,
                        "transcript": partial.text,
                    }
                )

        return emit

    def _on_commit(self, endpoint: Endpoint) -> None:
        self.io.emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "item_id": self._item_id,
                "audio_end_ms": (endpoint.last_voiced_index + 1) * FRAME_MS,
            }
        )
        response = self.response
        if response is None or response.committed.is_set():
            response = self._start_response(speculative=False)
        else:
            self.counters.speculative_commits += 1
        response.timings["endpoint_ms"] = (endpoint.frame_index - endpoint.last_voiced_index) * FRAME_MS
        self._commit(response)

    def _start_response(self, speculative: bool, preset: UtteranceInput | None = None) -> Response:
        response = Response("resp_" + uuid.uuid4().hex[:12], self._item_id, speculative, preset)
        if speculative:
            self.counters.speculative_starts += 1
        self.response = response
        response.task = self._spawn(self._generate(response), f"response:{response.id}")
        return response

    def _cancel_speculation(self) -> None:
        response = self.response
        if response is not None and not response.committed.is_set():
            self._cancel_tasks(response)
            if response.transcriber is not None:  # the utterance goes on: its transcript is moot
                response.transcriber.cancel()
            self.counters.speculative_cancels += 1
            self.response = None

    def _commit(self, response: Response) -> None:
        self.counters.responses += 1
        response.timings["turn"] = next(self._turns)
        self._set_state(State.RESPONDING)
        self.io.output.audio_sent.clear()
        response.audio_base = self.io.output.audio_frames_sent
        response.committed.set()
        self.io.emit({"type": "response.created", "response": {"id": response.id, "status": "in_progress"}})
        self._record_user(response)
        for delta in response.pending_deltas:
            self._emit_delta(response, delta)
        for chunk in response.pending_chunks:
            self._play(response, chunk)
        response.pending_deltas.clear()
        response.pending_chunks.clear()
        response.watcher = self._spawn(self._watch_audio_start(response), f"audio-start:{response.id}")

    def _interrupt(self, status: str) -> None:
        """End the committed reply now: silence at once, cancel its work, keep only what was heard."""
        response = self.response
        if response is None:
            return
        self.response = None
        self.io.output.flush()
        self._cancel_tasks(response)
        heard = heard_text(response.played, self._heard_ms(response))
        if heard:
            self._add_assistant(response, Turn("assistant", heard, status, response.id))
        self._finish(response, status, heard)

    # ---- the reply pipeline ---------------------------------------------------------------

    async def _generate(self, response: Response) -> None:
        started = time.monotonic()
        if response.preset is not None:
            response.user = response.preset
        else:
            response.user = await self.models.tokenizer.finalize()
            response.timings["asr_ms"] = _ms(time.monotonic() - started)
        if response.user.empty:
            await response.committed.wait()
            self._record_user(response)
            self._end_without_reply(response)
            return
        # The prompt first: recording the turn adds it to the history (when already committed),
        # and the prompt must carry it once, as `pending_user`.
        messages = self.context.messages(pending_user=response.user.lm_content or response.user.text)
        if response.user.transcribe is not None:
            response.transcriber = self._spawn(self._transcribe(response), f"transcript:{response.id}")
        self._record_user(response)
        # Both generators are closed here, whatever ends the reply: a cancel lands in only one of
        # them, and the LM stops generating only when its stream is closed.
        async with aclosing(self._text_stream(response, messages)) as text:
            async with aclosing(self.models.decoder.synthesize(text)) as speech:
                async for chunk in speech:
                    if "tts_first_audio_ms" not in response.timings:
                        response.timings["tts_first_audio_ms"] = _ms(time.monotonic() - response.timings["_first_delta"])
                    if response.committed.is_set():
                        self._play(response, chunk)
                    else:
                        response.pending_chunks.append(chunk)
        await response.committed.wait()
        await self.io.output.drained.wait()
        if self.response is response:
            self.response = None
            self._add_assistant(response, Turn("assistant", response.text.strip(), "completed", response.id))
            self._finish(response, "completed", response.text.strip())

    async def _text_stream(self, response: Response, messages: list) -> AsyncGenerator[str, None]:
        lm_start = time.monotonic()
        async with aclosing(self.models.lm.stream(messages)) as deltas:
            async for delta in deltas:
                if "_first_delta" not in response.timings:
                    response.timings["_first_delta"] = time.monotonic()
                    response.timings["lm_ttft_ms"] = _ms(time.monotonic() - lm_start)
                response.text += delta
                if response.committed.is_set():
                    self._emit_delta(response, delta)
                else:
                    response.pending_deltas.append(delta)
                yield delta

    async def _watch_audio_start(self, response: Response) -> None:
        await self.io.output.audio_sent.wait()
        response.timings["server_v2v_ms"] = _ms(time.monotonic() - self._last_voiced_at)
        self.io.emit({"type": "response.audio.started", "response_id": response.id})

    async def _transcribe(self, response: Response) -> None:
        user = response.user
        assert user is not None and user.transcribe is not None
        try:
            text = await user.transcribe()
        except Exception as exc:  # the history then keeps the LM content; the reply goes on
            self.log.warning("controller.transcript_failed", item_id=response.item_id, error=repr(exc))
            text = ""
        response.user = replace(user, text=text, transcribe=None)
        self._record_user(response)

    def _add_assistant(self, response: Response, turn: Turn) -> None:
        """The reply's turn goes into the history after the user's turn it answers."""
        if response.user_recorded or response.preset is not None:
            self.context.add(turn)
        else:
            response.held_assistant = turn

    def _record_user(self, response: Response) -> None:
        """Store and announce the user's turn once it is both committed and transcribed."""
        if response.user_recorded or response.user is None or not response.committed.is_set():
            return
        if response.user.transcribe is not None:  # the transcript is on its way
            return
        response.user_recorded = True
        if response.preset is None:
            self.io.emit(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": response.item_id,
                    "transcript": response.user.text,
                }
            )
        if not response.user.empty:
            # Without a transcript (a tokenizer that gives only LM content), the history keeps that.
            text = response.user.text if response.user.text.strip() else response.user.lm_content or ""
            self.context.add(Turn("user", text, "completed", response.item_id))
        if response.held_assistant is not None:
            self.context.add(response.held_assistant)
            response.held_assistant = None

    def _emit_delta(self, response: Response, delta: str) -> None:
        self.io.emit({"type": "response.text.delta", "response_id": response.id, "delta": delta})

    def _play(self, response: Response, chunk: SpeechChunk) -> None:
        self.io.output.write(chunk.pcm, chunk.sample_rate)
        response.played.append((chunk.text, chunk.duration_ms))

    def _heard_ms(self, response: Response) -> float:
        sent_ms = float((self.io.output.audio_frames_sent - response.audio_base) * FRAME_MS)
        if response.client_position_ms is not None:
            return min(response.client_position_ms, sent_ms)
        return max(0.0, sent_ms - self.config.client_buffer_ms)

    def _end_without_reply(self, response: Response) -> None:
        if self.response is response:
            self.response = None
        self._finish(response, "cancelled", "")

    def _finish(self, response: Response, status: str, text: str) -> None:
        if self.state == State.RESPONDING:
            self._set_state(State.LISTENING)
        self.io.emit(
            {"type": "response.done", "response": {"id": response.id, "status": status, "output_text": text}}
        )
        metrics = {k: v for k, v in response.timings.items() if not k.startswith("_")}
        self.io.emit({"type": "metrics.turn", "response_id": response.id, "speculative": response.speculative, **metrics})
        self.io.emit({"type": "session.summary", **asdict(self.counters)})
        self.log.info("controller.turn", response_id=response.id, status=status, **metrics)

    # ---- client events --------------------------------------------------------------------

    def on_client_event(self, event: ClientEvent) -> None:
        if event.type == "session.update":
            self._update_session(event)
        elif event.type == "response.cancel":
            if self.response is not None and self.response.committed.is_set():
                self._interrupt("cancelled")
            else:
                self._cancel_speculation()
        elif event.type == "playback.position":
            response = self.response
            target = event.data["response_id"]
            if response is not None and (target is None or target == response.id):
                response.client_position_ms = event.data["position_ms"]
        elif event.type == "conversation.item.create":
            if self.state == State.RESPONDING:
                self._interrupt("interrupted")
            self._cancel_speculation()
            self._item_id = "item_" + uuid.uuid4().hex[:12]
            self._commit(self._start_response(False, UtteranceInput(event.data["text"])))

    def _update_session(self, event: ClientEvent) -> None:
        session = event.data["session"]
        unknown = set(session) - {"turn_detection"}
        changes = session.get("turn_detection", {})
        try:
            if unknown:
                raise ValueError(f"unknown session fields {sorted(unknown)}; known: ['turn_detection']")
            if not isinstance(changes, dict):
                raise ValueError("turn_detection must be an object")
            config = self.config.updated(changes)
        except ValueError as exc:
            self.io.emit(error_event("invalid_value", str(exc), event.event_id))
            return
        self.config = config
        self.endpointer.reconfigure(config)
        if self.state == State.RESPONDING:
            self.endpointer.min_speech_ms = config.bargein_min_speech_ms
        self.io.emit({"type": "session.updated", "session": self._session_info()})

    def _session_info(self) -> dict[str, Any]:
        return {"id": self.io.session_id, "profile": self.profile, "turn_detection": self.config.public()}

    # ---- task ownership -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"{self.io.session_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("controller.task_failed", task=task.get_name(), error=repr(task.exception()))
            self.io.emit(error_event("server_error", "the reply failed; see the server log"))
            if self.response is not None and self.response.task is task:
                self._interrupt("cancelled")

    def _cancel_tasks(self, response: Response) -> None:
        for task in (response.task, response.watcher):
            if task is not None:
                task.cancel()

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.models.tokenizer.aclose()
        self.log.info("controller.summary", state=self.state.value, **asdict(self.counters))
