"""The per-session Controller: Step-Audio's turn-taking state machine with speculative responses.

LISTENING -> USER_SPEAKING -> USER_PAUSED -> RESPONDING -> LISTENING. At a pause a reply is
prepared speculatively (transcript, LM, speech into a buffer, nothing played); speech resuming
cancels it; the commit plays the buffer at once. A sound over the agent pauses its audio at
once; confirmed speech is a barge-in unless it stays short and holds no words but a backchannel
("mm-hmm"): then the reply resumes where it paused. What a reply does is `Reply`'s; when and
whether is decided here.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import structlog

from config import TurnConfig
from context.dialog import DialogContext
from controller.backchannel import is_backchannel
from controller.reply import Reply, SessionModels
from controller.turn_end import TurnJudge, Verdict
from realtime.events import (
    ClientEvent,
    ConversationItemCreate,
    ConversationItemTruncate,
    ConversationItemTruncated,
    Error,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    MetricsTurn,
    PlaybackPosition,
    ResponseCancel,
    ResponseDone,
    SessionCreated,
    SessionState,
    SessionSummary,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionDelta,
)
from realtime.session import SessionIO
from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from streaming_tokenizer.base import PartialCallback, UtteranceInput
from vad.endpointer import Endpoint, Endpointer, Kind

__all__ = ["Controller", "SessionModels", "State"]

ARRIVALS_KEPT = 10_000 // FRAME_MS + 1  # the longest commit delay a session can set
ENDED_REPLIES_KEPT = 8

log = structlog.get_logger()


class State(enum.StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    USER_PAUSED = "user_paused"
    RESPONDING = "responding"


@dataclass
class Counters:
    speculative_starts: int = 0
    speculative_commits: int = 0
    speculative_cancels: int = 0
    responses: int = 0
    bargeins: int = 0
    resumes: int = 0  # speech over the agent that proved not a turn: the reply played on
    late_resumes: int = 0  # speech soon after a commit (the reply barely heard): one utterance continued


class Controller:
    """Owns one session's turn-taking: the endpointer, the state, the current reply (and one held
    paused while speech over it is judged), and every task the session's replies start."""

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
        self.profile = profile
        self.log = log.bind(session_id=io.session_id)
        if config.semantic and models.turn_end is None:
            self.log.warning("controller.no_turn_model", profile=profile, using="vad")
            config = replace(config, type="vad")
        self.config = config
        self.endpointer = Endpointer(config)
        self.state = State.LISTENING
        self.counters = Counters()
        self.response: Reply | None = None
        self._held: Reply | None = None  # paused by speech that may prove a backchannel
        self._held_at = 0  # the frame at which that speech was confirmed
        self._held_check: asyncio.Task[None] | None = None
        self._tasks = TaskOwner(io.session_id, self._task_failed)
        self.judge = TurnJudge(models.turn_end, self._tasks) if models.turn_end is not None else None
        self._item_id = ""
        self._turns = itertools.count(1)
        self._arrivals: collections.deque[float] = collections.deque(maxlen=ARRIVALS_KEPT)  # of the latest frames
        self._frame_index = -1
        self._ended: dict[str, Reply] = {}  # the latest replies, for a truncate after they ended

    # ---- the frame loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.io.emit(SessionCreated(self._session_info()))
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
        self._arrivals.append(time.monotonic())
        voiced = self.endpointer.last_voiced_index == self._frame_index
        if endpoint is not None and endpoint.kind == Kind.SPEECH_STARTED:
            self._on_speech_started(endpoint)
        elif self.state in (State.USER_SPEAKING, State.USER_PAUSED):
            self.models.tokenizer.feed(frame, voiced)
            if self.judge is not None:
                self.judge.feed(frame)
        if self.state == State.RESPONDING:
            self._pause_on_onset()
        elif self._held is not None and self.state == State.USER_SPEAKING:
            held_ms = (self._frame_index - self._held_at) * FRAME_MS + self.config.bargein_min_speech_ms
            if held_ms >= self.config.backchannel_max_ms:  # too long for a backchannel
                self._end_held("interrupted", bargein=True)
        if endpoint is None:
            if self.state == State.USER_PAUSED and self.config.semantic and self._held is None:
                self._judge_pause()
            return
        if endpoint.kind == Kind.SPEECH_STARTED:
            return
        if endpoint.kind == Kind.PAUSED:
            self._set_state(State.USER_PAUSED)
            if self._held is not None:
                self._held_check = self._tasks.spawn(self._judge_interruption(self._held), f"interruption:{self._held.id}")
            else:
                self._speculate()
        elif endpoint.kind == Kind.RESUMED:
            self._set_state(State.USER_SPEAKING)
            self._cancel_speculation()
            self._tasks.cancel(self._held_check)  # judged again at the next pause, on more speech
            if self.judge is not None:
                self.judge.reset()
        elif endpoint.kind == Kind.COMMITTED:
            self._end_held("interrupted", bargein=True)
            self._on_commit(endpoint, "timeout" if self.config.semantic else "vad")

    def _speculate(self) -> None:
        self._start_reply(speculative=True)
        if self.config.semantic and self.judge is not None:  # semantic implies a judge
            self.judge.reset()
            self._judge_pause()

    def _judge_pause(self) -> None:
        """Semantic turn detection, at each silent frame of a pause: a turn judged complete is
        committed after `min_commit_ms` of silence, one that might go on halfway to
        `max_commit_ms`; else the endpointer commits it at `max_commit_ms`."""
        judge, silence_ms, config = self.judge, self.endpointer.silence_ms, self.config
        assert judge is not None
        reply = self.response
        transcript = reply.user.text if reply is not None and reply.user is not None else None
        judge.step(silence_ms, transcript)
        verdict = judge.verdict(config.eagerness)
        wait_ms = {
            Verdict.COMPLETE: config.min_commit_ms,
            Verdict.UNSURE: (config.min_commit_ms + config.max_commit_ms) // 2,
        }.get(verdict)
        if wait_ms is not None and silence_ms >= wait_ms:
            self._on_commit(self.endpointer.commit_now(), f"semantic:{verdict}")

    # ---- transitions ----------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.endpointer.agent_speaking(state == State.RESPONDING)
            self._emit_state()

    def _emit_state(self) -> None:
        self.io.emit(SessionState(self.state.value))

    def _on_speech_started(self, endpoint: Endpoint) -> None:
        continuing = self.state == State.RESPONDING and self._barge_in()
        if continuing:
            for frame in endpoint.audio:
                self.models.tokenizer.feed(frame, True)
        else:
            self._item_id = "item_" + uuid.uuid4().hex[:12]
            self.models.tokenizer.begin(endpoint.audio, self._partial_emitter(self._item_id))
        if self.judge is not None:
            if continuing:
                for frame in endpoint.audio:
                    self.judge.feed(frame)
            else:
                self.judge.begin(endpoint.audio)
        self._set_state(State.USER_SPEAKING)
        onset_ms = (endpoint.frame_index + 1 - len(endpoint.audio)) * FRAME_MS
        self.io.emit(SpeechStarted(self._item_id, onset_ms))

    def _barge_in(self) -> bool:
        """The user speaks over the reply: hold it, paused, until the speech proves a turn or a
        backchannel (or stop it now, with `backchannel_max_ms` 0). Returns whether this speech
        continues the committed utterance instead: it came before the user heard `merge_heard_ms`
        of the reply, so the commit cut into a hesitation, and one utterance must stay one user
        turn."""
        reply = self.response
        if reply is not None and reply.cut_in():
            self.response = None
            reply.merge()
            self._finish(reply, "interrupted", "")
            self.counters.late_resumes += 1
            return True
        if reply is not None and self.config.backchannel_max_ms > 0:
            reply.pause()
            self.response, self._held, self._held_at = None, reply, self._frame_index
            return False
        self._interrupt("interrupted")
        self.counters.bargeins += 1
        return False

    def _pause_on_onset(self) -> None:
        """A sound over the agent silences it at once; one too short to be speech (a click, a
        cough) lets it play on."""
        reply = self.response
        if reply is None or not reply.committed:
            return
        onset_ms = self.endpointer.onset_ms
        if onset_ms >= self.config.agent_pause_ms:
            reply.pause()
        elif onset_ms == 0 and reply.paused:
            reply.resume()

    async def _judge_interruption(self, held: Reply) -> None:
        """At the first pause of the speech over `held`: a backchannel or no words resumes it;
        anything else is a barge-in, and the speech is the user's next turn."""
        try:
            user = await self.models.tokenizer.finalize()
            text: str | None = user.text if user.transcribe is None else await user.transcribe()
        except Exception as exc:  # unheard speech is taken for a turn, as without this check
            self.log.warning("controller.interruption_unheard", error=repr(exc))
            text = None
        if self._held is not held:
            return
        self._held_check = None  # this task: ending the held reply must not cancel it
        if text is not None and is_backchannel(text):
            self._resume_held(held, text)
        else:
            self.log.info("controller.interrupted", response_id=held.id, transcript=text)
            self._end_held("interrupted", bargein=True)
            self._speculate()

    def _resume_held(self, held: Reply, text: str) -> None:
        """The speech over `held` was not a turn: it plays on where it paused."""
        self._held = None
        self.response = held
        self.endpointer.dismiss()
        self.counters.resumes += 1
        self.log.info("controller.resumed", response_id=held.id, item_id=self._item_id, transcript=text)
        held.resume(self._item_id, text)
        self._set_state(State.RESPONDING)

    def _end_held(self, status: str, bargein: bool = False) -> None:
        """End the held reply, if any, keeping what was heard before its pause."""
        held, self._held = self._held, None
        self._tasks.cancel(self._held_check)
        self._held_check = None
        if held is None:
            return
        self.counters.bargeins += bargein
        self._finish(held, status, held.interrupt(status, self.config.client_buffer_ms))

    def _partial_emitter(self, item_id: str) -> PartialCallback:
        def emit(partial: UtteranceInput) -> None:
            if self._item_id == item_id:  # each partial replaces the one before
                self.io.emit(TranscriptionDelta(item_id, partial.text))

        return emit

    def _on_commit(self, endpoint: Endpoint, rule: str) -> None:
        self.io.emit(SpeechStopped(self._item_id, (endpoint.last_voiced_index + 1) * FRAME_MS))
        reply = self.response
        if reply is None or reply.committed:
            reply = self._start_reply(speculative=False)
        else:
            self.counters.speculative_commits += 1
        reply.timings["endpoint_ms"] = (endpoint.frame_index - endpoint.last_voiced_index) * FRAME_MS
        reply.turn["commit_rule"] = rule
        if self.config.semantic and self.judge is not None:
            scores = self.judge.scores
            for name, score in (("eot_audio", scores.audio), ("eot_text", scores.text)):
                if score is not None:
                    reply.turn[name] = round(score, 3)
            if scores.question:
                reply.turn["eot_question"] = True
        self._commit(reply)

    def _start_reply(self, speculative: bool, preset: UtteranceInput | None = None) -> Reply:
        reply = Reply(
            "resp_" + uuid.uuid4().hex[:12],
            self._item_id,
            speculative,
            self.io,
            self.models,
            self.context,
            self._tasks,
            self._reply_ended,
            preset,
        )
        if speculative:
            self.counters.speculative_starts += 1
        self.response = reply
        return reply

    def _cancel_speculation(self) -> None:
        reply = self.response
        if reply is not None and not reply.committed:
            reply.cancel()
            self.counters.speculative_cancels += 1
            self.response = None

    def _commit(self, reply: Reply) -> None:
        self.counters.responses += 1
        self._set_state(State.RESPONDING)
        reply.commit(next(self._turns), self._voice_end_at(), self.config.merge_heard_ms, self.config.client_buffer_ms)

    def _voice_end_at(self) -> float:
        """When the user's last voiced frame came in (monotonic clock)."""
        if not self._arrivals:  # a typed message before any audio
            return time.monotonic()
        back = self._frame_index - self.endpointer.last_voiced_index
        return self._arrivals[-1 - min(back, len(self._arrivals) - 1)]

    def _interrupt(self, status: str) -> None:
        """End the committed reply now, keeping only what was heard."""
        reply = self.response
        if reply is None:
            return
        self.response = None
        self._finish(reply, status, reply.interrupt(status, self.config.client_buffer_ms))

    def _reply_ended(self, reply: Reply, status: str, text: str) -> None:
        if self.response is reply:
            self.response = None
        if self._held is reply:  # all of it had gone out before the pause
            self._held = None
            self._tasks.cancel(self._held_check)
        self._finish(reply, status, text)

    def _finish(self, reply: Reply, status: str, text: str) -> None:
        self._ended[reply.id] = reply
        while len(self._ended) > ENDED_REPLIES_KEPT:
            self._ended.pop(next(iter(self._ended)))
        if self.state == State.RESPONDING:
            self._set_state(State.LISTENING)
        self.io.emit(ResponseDone(reply.id, status, text))
        metrics: dict[str, float | str] = {k: v for k, v in reply.timings.items() if not k.startswith("_")}
        metrics |= reply.turn
        self.io.emit(MetricsTurn(reply.id, reply.speculative, metrics))
        self.io.emit(SessionSummary(asdict(self.counters)))
        self.log.info("controller.turn", response_id=reply.id, status=status, **metrics)

    # ---- client events --------------------------------------------------------------------

    def on_client_event(self, event: ClientEvent) -> None:
        if isinstance(event, SessionUpdate):
            self._update_session(event)
        elif isinstance(event, ResponseCancel):
            if self._held is not None:
                self._end_held("cancelled")
            elif self.response is not None and self.response.committed:
                self._interrupt("cancelled")
            else:
                self._cancel_speculation()
        elif isinstance(event, PlaybackPosition):
            reply = self._held or self.response
            if reply is not None and event.response_id in (None, reply.id):
                reply.client_position_ms = event.position_ms
        elif isinstance(event, ConversationItemTruncate):
            self._truncate(event)
        elif isinstance(event, InputAudioBufferCommit):
            self._commit_now(event)
        elif isinstance(event, InputAudioBufferClear):
            self._clear_speech()
        elif isinstance(event, ConversationItemCreate):
            self._end_held("interrupted")
            if self.state == State.RESPONDING:
                self._interrupt("interrupted")
            self._cancel_speculation()
            self._item_id = "item_" + uuid.uuid4().hex[:12]
            self._commit(self._start_reply(False, UtteranceInput(event.text)))

    def _truncate(self, event: ConversationItemTruncate) -> None:
        """The client played only so much of a reply: while it runs, that is what the user will
        have heard; once it has ended, its history entry is cut back (or out) to it."""
        live = next((r for r in (self.response, self._held) if r is not None and r.id == event.item_id), None)
        if live is not None:
            live.client_position_ms = event.audio_end_ms
            heard = live.heard_in(event.audio_end_ms)
        elif (ended := self._ended.get(event.item_id)) is not None:
            heard = ended.heard_in(event.audio_end_ms)
            self.context.replace_text(event.item_id, "assistant", heard)
        else:
            self.io.emit(Error("item_not_found", f"no reply {event.item_id!r} in this session", event.event_id))
            return
        self.io.emit(ConversationItemTruncated(event.item_id, event.audio_end_ms, heard))

    def _commit_now(self, event: InputAudioBufferCommit) -> None:
        """The client ends the user's turn (push-to-talk, or turn_detection `manual`)."""
        if not self.endpointer.in_turn:
            self.io.emit(Error("input_audio_buffer_commit_empty", "no speech to commit since the last turn", event.event_id))
            return
        self._end_held("interrupted", bargein=True)
        self._on_commit(self.endpointer.commit_now(), "client")

    def _clear_speech(self) -> None:
        """The client drops the user's speech under way: no turn; a reply it paused plays on."""
        if not self.endpointer.in_turn:
            return
        if self._held is not None:
            self._tasks.cancel(self._held_check)
            self._held_check = None
            self._resume_held(self._held, "")
            return
        self._cancel_speculation()
        self.endpointer.dismiss()
        if self.judge is not None:
            self.judge.reset()
        self._set_state(State.LISTENING)

    def _update_session(self, event: SessionUpdate) -> None:
        try:
            config = self.config.with_session(event.session)
            if config.semantic and self.judge is None:
                raise ValueError(f"turn_detection.type semantic: the {self.profile} profile has no end-of-turn model")
        except ValueError as exc:
            self.io.emit(Error("invalid_value", str(exc), event.event_id))
            return
        self.config = config
        self.endpointer.reconfigure(config)
        self.io.emit(SessionUpdated(self._session_info()))

    def _session_info(self) -> dict[str, Any]:
        return {"id": self.io.session_id, "profile": self.profile, "turn_detection": self.config.public()}

    # ---- task ownership -------------------------------------------------------------------

    def _task_failed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        self.log.error("controller.task_failed", task=task.get_name(), error=repr(exc))
        self.io.emit(Error("server_error", "the reply failed; see the server log"))
        if self.response is not None and self.response.runs(task):
            self._interrupt("cancelled")
        elif self._held is not None and self._held.runs(task):
            self._end_held("cancelled")

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return self._tasks.tasks

    async def _shutdown(self) -> None:
        # A hang-up (or a caller gone silent) mid-reply keeps what was heard, as a barge-in does.
        self._end_held("interrupted")
        self._interrupt("interrupted")
        await self._tasks.aclose()
        await self.models.tokenizer.aclose()
        self.log.info("controller.summary", state=self.state.value, **asdict(self.counters))
