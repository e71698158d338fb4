"""One reply: from the finalized utterance through the LM and the speech decoder to the output, and
every event and figure it makes."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, AsyncGenerator, Callable

import structlog

from context.dialog import DialogContext, Turn, heard_ids, heard_text
from context.exchange import Exchange
from controller.tool_use import ToolUse, spoken
from models.base import LanguageModel, Message, ModelIds, PromptCache, SpeechChunk, SpeechDecoder, ToolCall
from realtime.events import (
    MetricsTurn,
    ResponseAudioPaused,
    ResponseAudioResumed,
    ResponseAudioStarted,
    ResponseCreated,
    ResponseDone,
    ResponseOrder,
    ResponseTextDelta,
    TranscriptionCompleted,
)
from realtime.output import Playout
from realtime.session import SessionIO
from runtime.tasks import TaskOwner
from streaming_tokenizer.base import StreamingTokenizer, UtteranceInput
from tools.rules import route
from tools.toolbox import Toolbox
from turns.judge import TurnEndScorers
from vad.engines import SpeechDetector

log = structlog.get_logger()
MAX_TOOL_ROUNDS = 3  # rounds of calls in one reply; the last generation is offered no tools


@dataclass
class SessionModels:
    """The model handles one session uses (each holds that session's state, if any)."""

    detector: SpeechDetector
    tokenizer: StreamingTokenizer
    lm: LanguageModel
    decoder: SpeechDecoder
    turn_end: TurnEndScorers | None = None  # what `turn_detection: semantic` judges with
    tools: Toolbox | None = None  # the functions replies may call
    prompt_cache: PromptCache | None = None  # the LM engine, where it reads a long turn's start ahead


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


class Reply:
    """Owns one reply: its tasks (generation, the audio-start watcher, a transcript made beside it),
    the text and speech held back until the commit, what has gone out, its history entries, its
    `response.*` events and its metrics.

    A speculative reply is prepared at a pause and either committed (the held speech plays at once)
    or cancelled (nothing of it is ever heard or stored). A committed reply may be paused (a sound
    over it: silent, its audio kept) and resumed. However it ends (completed, interrupted: only what
    the user heard is kept, cancelled, merged into the user's continued turn) it ends once, in
    `_finish`: `response.done` and `metrics.turn` go out, `on_done(reply)` (its owner's bookkeeping)
    runs, and `done` holds the status. The owner's part runs there and then, so that whoever sees
    `response.done` already finds the session in its next state.
    """

    def __init__(
        self,
        reply_id: str,
        item_id: str,
        speculative: bool,
        io: SessionIO,
        models: SessionModels,
        context: DialogContext,
        tasks: TaskOwner,
        on_done: Callable[[Reply], None],
        preset: UtteranceInput | None = None,
        order: ResponseOrder | None = None,
        speak: bool = True,
        prefill: asyncio.Task[None] | None = None,
    ) -> None:
        """`prefill`: the LM reading the start of the user's turn ahead, waited for before the
        reply's own prompt goes in (it then evaluates only the rest)."""
        self.id = reply_id
        self.item_id = item_id
        self.speculative = speculative
        self.preset = preset  # a typed user message: no transcription needed
        self.order = order  # a `response.create`: the reply answers the history as it stands
        self.speaks = speak and (order is None or not order.text_only)  # else its text alone: no synthesis
        self.user: UtteranceInput | None = None
        self.text = ""
        self.ids: list[int] = []  # what an LM that speaks in its own ids wrote (ModelIds)
        # Stage timings and how the turn was ended (the rule, the end-of-turn scores): `metrics.turn`.
        self.metrics: dict[str, float | str] = {}
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._io = io
        self._log = log.bind(session_id=io.session_id)
        self._models = models
        self._context = context
        self._tasks = tasks
        self._on_done = on_done
        self._exchange = Exchange(context, item_id, hold_reply=preset is None and order is None, keep=order is None or not order.out_of_band)
        self._committed = asyncio.Event()
        self.paused = False
        self._announced = False  # the user's transcript was sent to the client
        # The user's turn goes into the history once it is final: when they have heard
        # `merge_heard_ms` of the reply, or it ends. Until then speech that resumes continues the
        # same utterance (merge()).
        self._user_final = preset is not None or order is not None
        self._pending_deltas: list[str] = []
        self._pending_chunks: list[SpeechChunk] = []
        self._played: list[tuple[str, float]] = []  # (text, ms) written to the output
        self._played_ids: list[tuple[tuple[int, ...], float]] = []  # (ids, ms), for an LM that speaks in ids
        self._first_playout: asyncio.Future[Playout] = asyncio.get_running_loop().create_future()
        self._last_playout: Playout | None = None
        self._voice_end_at = 0.0
        self._merge_heard_ms = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._lm_start = 0.0
        self._first_delta_at: float | None = None
        self._transcriber: asyncio.Task[None] | None = None
        self._prefill = prefill
        self._generation = tasks.spawn(self._generate(), f"response:{reply_id}")

    @property
    def committed(self) -> bool:
        return self._committed.is_set()

    def runs(self, task: asyncio.Task[object]) -> bool:
        """Whether `task` is this reply's generation."""
        return task is self._generation

    # ---- what the controller decides --------------------------------------------------------

    def commit(self, turn: int, voice_end_at: float, merge_heard_ms: float, how: dict[str, float | str]) -> None:
        """Play what is ready and everything that follows; `voice_end_at` is when the user's speech
        ended (monotonic clock), for the server's voice-to-voice time; until the user has heard
        `merge_heard_ms` of it, their turn can go on. `how` the turn was ended goes into the metrics."""
        self.metrics["turn"] = turn
        self.metrics |= how
        self._voice_end_at = voice_end_at
        self._merge_heard_ms = merge_heard_ms
        self._io.playback.begin(self.id)
        self._committed.set()
        self._io.emit(ResponseCreated(self.id, self.order))
        self._record_user()
        for delta in self._pending_deltas:
            self._io.emit(ResponseTextDelta(self.id, delta))
        for chunk in self._pending_chunks:
            self._play(chunk)
        self._pending_deltas.clear()
        self._pending_chunks.clear()
        self._watcher = self._tasks.spawn(self._watch_audio_start(), f"audio-start:{self.id}")

    def pause(self) -> None:
        """Silence from the next frame on, keeping what is queued and what is still to come."""
        if not self.paused:
            self.paused = True
            self._io.output.pause()
            self._io.emit(ResponseAudioPaused(self.id))

    def resume(self, item_id: str | None = None, transcript: str = "") -> None:
        """Play on from where the pause began; `item_id` names the speech that was not a turn."""
        if self.paused:
            self.paused = False
            self._io.output.resume()
            self._io.emit(ResponseAudioResumed(self.id, item_id, transcript))

    def cancel(self) -> None:
        """Drop a speculation: the utterance goes on, so its transcript is moot too."""
        self._drop("cancelled")

    def cut_in(self) -> bool:
        """Whether the user's turn can still go on: they have heard less than `merge_heard_ms` of
        this reply, so speech now means the commit cut into a hesitation."""
        return not self._user_final and self._io.playback.heard_ms() < self._merge_heard_ms

    def merge(self) -> None:
        """The user went on after hearing little or nothing: drop this reply and keep nothing of
        the turn, which continues as the same utterance (one user turn, transcribed whole,
        answered anew)."""
        self._flush()
        self._drop("interrupted")

    def _drop(self, status: str) -> None:
        self._stop()
        self._tasks.cancel(self._transcriber)
        self._finish(status, "")

    def interrupt(self, status: str) -> None:
        """End now (`status`: interrupted or cancelled): silence at once, cancel the work, keep what
        the user heard."""
        if self.done.done():
            return
        self._flush()
        self._stop()
        self._user_is_final()
        heard_ms = self._io.playback.heard_ms()
        heard, ids = heard_text(self._played, heard_ms), heard_ids(self._played_ids, heard_ms)
        if heard or ids:
            self._exchange.add_reply(Turn("assistant", heard, status, self.id, ids=ids))
        self._finish(status, heard)

    def said_around_heard(self, before_ms: float, after_ms: float) -> str:
        """The reply's words from `before_ms` before the point the client has heard to `after_ms` after it."""
        heard = self._io.playback.heard_ms()
        skipped = len(heard_text(self._played, max(0.0, heard - before_ms)).split())
        return " ".join(heard_text(self._played, heard + after_ms).split()[skipped:])

    def heard_in(self, played_ms: float) -> str:
        """The text of the reply's first `played_ms` of audio."""
        return heard_text(self._played, played_ms)

    def heard_ids_in(self, played_ms: float) -> tuple[int, ...]:
        """The LM ids of the reply's first `played_ms` of audio (for an LM that speaks in ids)."""
        return heard_ids(self._played_ids, played_ms)

    def _flush(self) -> None:
        self.paused = False  # a flush ends the output's pause too
        self._io.output.flush()

    def _stop(self) -> None:
        self._tasks.cancel(self._generation)
        self._tasks.cancel(self._watcher)

    def _finish(self, status: str, text: str) -> None:
        """The one way a reply ends: what a committed reply reports, then the owner's bookkeeping."""
        if self.done.done():
            return
        if self.committed:
            self._io.emit(ResponseDone(self.id, status, text))
            self._io.emit(MetricsTurn(self.id, self.speculative, self.metrics))
            self._log.info("controller.turn", response_id=self.id, status=status, **self.metrics)
        self.done.set_result(status)
        self._on_done(self)

    # ---- the pipeline -----------------------------------------------------------------------

    async def _generate(self) -> None:
        if self.order is not None:
            messages = self._context.messages(system_prompt=self.order.instructions)
        else:
            messages = await self._user_turn()
            if not messages:
                return
        # Both generators are closed here, whatever ends the reply: a cancel lands in only one of
        # them, and the LM stops generating only when its stream is closed.
        async with aclosing(self._text_stream(messages)) as text:
            if not self.speaks:
                async for _ in text:
                    pass
            else:
                async with aclosing(self._models.decoder.synthesize(text)) as speech:
                    async for chunk in speech:
                        if "tts_first_audio_ms" not in self.metrics and self._first_delta_at is not None:
                            self.metrics["tts_first_audio_ms"] = _ms(time.monotonic() - self._first_delta_at)
                        if self.committed:
                            self._play(chunk)
                        else:
                            self._pending_chunks.append(chunk)
        await self._committed.wait()
        if self._last_playout is not None:
            await self._last_playout.finished.wait()
        if self.done.done():
            return
        text = self.text.strip()
        self._exchange.add_reply(Turn("assistant", text, "completed", self.id, ids=tuple(self.ids)))
        self._complete("completed", text)

    async def _user_turn(self) -> list[Message]:
        """The user's turn, final (transcribed, or typed), recorded once committed; the prompt that
        answers it, or none if it was empty (the reply then ends, cancelled)."""
        started = time.monotonic()
        if self.preset is not None:
            self.user = self.preset
        else:
            self.user = await self._models.tokenizer.finalize()
            self.metrics["asr_ms"] = _ms(time.monotonic() - started)
        if self.user.empty:
            await self._committed.wait()
            self._record_user()
            self._complete("cancelled", "")
            return []
        # The prompt first: recording the turn adds it to the history (when already committed),
        # and the prompt must carry it once, as `pending_user`.
        messages = self._context.messages(pending_user=self.user.lm_content or self.user.text, pending_audio=self.user.audio)
        if self.user.transcribe is not None:
            self._transcriber = self._tasks.spawn(self._transcribe(), f"transcript:{self.id}")
        self._record_user()
        return messages

    def _complete(self, status: str, text: str) -> None:
        """The reply ended by itself: all of it went out (or there was nothing to say)."""
        if self.paused:  # everything had gone out before the pause: nothing to hold back
            self.paused = False
            self._io.output.resume()
        self._user_is_final()
        self._finish(status, text)

    async def _text_stream(self, messages: list[Message]) -> AsyncGenerator[str | ModelIds, None]:
        """The reply's words (and the ids of an LM that speaks in its own): the LM's, and around
        its function calls what the reply says while they run. An LM that cannot call tools gets
        the rule's call for the questions it knows, whose answer is then the tool's own sentence."""
        self._lm_start = time.monotonic()
        toolbox, lm = self._models.tools, self._models.lm
        if self.order is not None and self.order.say is not None:
            yield self._said(self.order.say)
            return
        if toolbox is None:
            async for delta in self._lm_text(messages, None, []):
                yield delta
            return
        use = ToolUse(toolbox, self.id, self._io, self._exchange, self._tasks, self._committed)
        if not lm.calls_tools:
            call = route(self.user.text if self.user is not None else "")
            if call is not None and call.name in toolbox.tools:
                async for said in use.run([call]):
                    yield self._said(said, new_part=True)
                if use.results[0].ok:
                    yield self._said(spoken(use.results[0]), new_part=True)
                return
            async for delta in self._lm_text(messages, None, []):
                yield delta
            return
        for rounds_left in range(MAX_TOOL_ROUNDS, -1, -1):
            calls: list[ToolCall] = []
            text, first_id = "", len(self.ids)
            async for delta in self._lm_text(messages, toolbox.schemas() if rounds_left else None, calls):
                text += delta if isinstance(delta, str) else ""
                yield delta
            if not calls:
                return
            async for said in use.run(calls):
                yield self._said(said, new_part=True)
            messages = [
                *messages,
                Message("assistant", text, tuple(calls), ids=tuple(self.ids[first_id:])),
                *(Message("tool", r.output, tool_call_id=r.call.id) for r in use.results),
            ]

    async def _lm_text(
        self, messages: list[Message], tools: list[dict[str, Any]] | None, calls: list[ToolCall]
    ) -> AsyncGenerator[str | ModelIds, None]:
        """One LM generation's text (and ids); the calls it makes are added to `calls`."""
        lm = self._models.lm
        first = True
        if self._prefill is not None and not self._prefill.done():
            await asyncio.wait([self._prefill])  # not cancelled with this reply: it is the next one's too
        async with aclosing(lm.stream(messages) if tools is None else lm.stream(messages, tools=tools)) as deltas:
            async for delta in deltas:
                if isinstance(delta, ToolCall):
                    calls.append(delta)
                elif isinstance(delta, ModelIds):
                    self.ids += delta.ids
                    yield delta
                else:
                    yield self._said(delta, new_part=first)
                    first = False

    def _said(self, delta: str, new_part: bool = False) -> str:
        """A piece of the reply's text: timed, kept, and sent (or held until the commit). A new
        part (a generation's first words, a filler) is set apart from the sentence before it."""
        if new_part and self.text and not self.text[-1].isspace() and not delta[:1].isspace():
            delta = " " + delta
        if self._first_delta_at is None:
            self._first_delta_at = time.monotonic()
            self.metrics["lm_ttft_ms"] = _ms(self._first_delta_at - self._lm_start)
        self.text += delta
        if self.committed:
            self._io.emit(ResponseTextDelta(self.id, delta))
        else:
            self._pending_deltas.append(delta)
        return delta

    def _play(self, chunk: SpeechChunk) -> None:
        playout = self._io.output.write(chunk.pcm, chunk.sample_rate)
        if not self._first_playout.done():
            self._first_playout.set_result(playout)
        self._last_playout = playout
        self._played.append((chunk.text, chunk.duration_ms))
        self._played_ids.append((chunk.ids, chunk.duration_ms))

    async def _watch_audio_start(self) -> None:
        await (await self._first_playout).started.wait()
        self.metrics["server_v2v_ms"] = _ms(time.monotonic() - self._voice_end_at)
        self._io.emit(ResponseAudioStarted(self.id))
        while not self.done.done() and (left_ms := self._merge_heard_ms - self._io.playback.heard_ms()) > 0:
            await asyncio.sleep(left_ms / 1000)  # a timer: heard audio stops growing while paused
        self._user_is_final()

    async def _transcribe(self) -> None:
        user = self.user
        assert user is not None and user.transcribe is not None
        try:
            text = await user.transcribe()
        except Exception as exc:  # the history then keeps the LM content; the reply goes on
            self._log.warning("controller.transcript_failed", item_id=self.item_id, error=repr(exc))
            text = ""
        self.user = replace(user, text=text, transcribe=None)
        self._record_user()

    def _user_is_final(self) -> None:
        self._user_final = True
        self._record_user()

    def _record_user(self) -> None:
        """Announce the user's turn once it is committed and transcribed, and store it once it is
        also final."""
        user = self.user
        if user is None or not self.committed or user.transcribe is not None:  # a transcript is on its way
            return
        if not self._announced:
            self._announced = True
            if self.preset is None:
                self._io.emit(TranscriptionCompleted(self.item_id, user.text))
        if self._exchange.user_recorded or not self._user_final:
            return
        # Without a transcript (a tokenizer that gives only LM content), the history keeps that.
        text = user.text if user.text.strip() else user.lm_content or ""
        self._exchange.add_user(None if user.empty else text, user.audio)
