"""The per-session Controller: Step-Audio's turn-taking state machine with speculative responses.

LISTENING -> USER_SPEAKING -> USER_PAUSED -> RESPONDING -> LISTENING. At a pause a reply is prepared
(transcript, LM, speech into a buffer, nothing played); speech resuming cancels it; the commit plays
it at once. Sound over the agent pauses it; confirmed speech holds it (OVERLAP) until the speech
proves a turn (a barge-in) or a backchannel ("mm-hmm": it resumes). When a turn starts, pauses and
ends is the TurnTaker's to say, what a reply does is `Reply`'s; what to do about each is decided here.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import asdict
from typing import Any

import numpy as np
import structlog

from config import TurnConfig
from context.dialog import DialogContext, Turn
from controller.backchannel import is_backchannel
from controller.own_voice import SAID_AFTER_MS, SAID_BEFORE_MS, is_own_voice
from controller.replies import Counters, Replies
from controller.reply import Reply, SessionModels
from controller.utterance import Utterance
from realtime import events as ev
from realtime.session import SessionIO
from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from runtime.workers import StageStuck
from streaming_tokenizer.base import UtteranceInput
from turns import events as turn
from turns.taker import TurnTaker
from vad.endpointer import Phase

__all__ = ["Controller", "SessionModels", "State"]

CLIENT_ECHO = "client_echo_cancellation"  # session.update: the client cancels the echo of what it plays itself (or not)
# session.update: the session's system prompt; whether a committed turn gets a reply on its own
# (else the client asks with `response.create`); whether speech over a reply interrupts it.
# whether replies are text alone (no speech synthesized).
INSTRUCTIONS, CREATE_RESPONSE, INTERRUPT_RESPONSE, TEXT_ONLY = "instructions", "create_response", "interrupt_response", "text_only"
CONTROLLER_SETTINGS = (CLIENT_ECHO, INSTRUCTIONS, CREATE_RESPONSE, INTERRUPT_RESPONSE, TEXT_ONLY)


class State(enum.StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    USER_PAUSED = "user_paused"
    OVERLAP = "overlap"  # the agent paused under the user's speech, until it proves a turn or not
    RESPONDING = "responding"


class Controller:
    """Owns one session's turn-taking: the turn taker, the state, the user's utterance, the
    session's replies, and every task they start."""

    def __init__(self, io: SessionIO, models: SessionModels, context: DialogContext, config: TurnConfig, profile: str) -> None:
        self.io, self.models, self.context, self.profile = io, models, context, profile
        self.log = structlog.get_logger().bind(session_id=io.session_id)
        self._tasks = TaskOwner(io.session_id, self._task_failed)
        self.turns = TurnTaker(config, models.detector, models.turn_end, self._tasks, self.log)
        self.utterance = Utterance(io, models.tokenizer)
        self.counters = Counters()
        self.replies = Replies(io, models, context, self._tasks, self.log, self.counters, self._reply_ended)
        self.state = State.LISTENING
        self.create_response = True
        self.interrupt_response = True
        self._quiet_since: int | None = None  # the frame when the last reply ended, while the user is silent
        self._asked_if_there = False  # the idle prompt was said since the user last spoke
        self._stable: str | None = None  # the start of the turn under way, known for good, not yet read ahead
        self._apply_session(io.defaults)

    @property
    def config(self) -> TurnConfig:
        return self.turns.config

    async def run(self) -> None:
        self.io.emit(ev.SessionCreated(self._session_info()))
        self.io.emit(ev.SessionState(self.state.value))
        try:
            while True:
                self.on_frame(await self.io.frames.get())
        finally:
            await self._shutdown()

    def on_frame(self, frame: np.ndarray) -> None:
        if self.state == State.RESPONDING and not self.interrupt_response:
            frame = np.zeros_like(frame)  # the agent holds the floor: nothing said over it is heard
        speaking = self.turns.phase == Phase.SPEAKING  # before this frame
        events = self.turns.feed(frame, self.replies.transcript, judging=self.replies.held is None)
        started = next((e for e in events if isinstance(e, turn.SpeechStarted)), None)
        if started is not None:
            self._on_speech_started(started)
        elif self.state in (State.USER_SPEAKING, State.USER_PAUSED, State.OVERLAP):  # the utterance goes on
            self.utterance.hear(frame, self.turns.voiced)
        held = self.replies.held
        if held is not None and (speaking or started is not None) and held.too_long(self.turns.frame_index, self.config.interruption):
            self._barge_in_over_held(State.USER_SPEAKING, None)
        for event in events:
            self._on_turn_event(event)
        if self._quiet_since is not None and self.state == State.LISTENING:
            self._check_idle()

    def _on_turn_event(self, event: turn.TurnEvent) -> None:
        reply, held = self.replies.current, self.replies.held
        match event:
            case turn.OverlapOnset() if self.state == State.RESPONDING and reply is not None and reply.committed:
                reply.pause()  # silent at once; a click or a cough lets it play on
            case turn.OverlapDropped() if self.state == State.RESPONDING and reply is not None and reply.paused:
                reply.resume()
            case turn.SpeechPaused() if held is not None:
                held.judge(self.models.tokenizer, self._heard_over_held)
            case turn.SpeechPaused():
                self._set_state(State.USER_PAUSED)
                if self.create_response:
                    self.replies.start(self.utterance.item_id, speculative=True)
            case turn.SpeechResumed() if held is not None:
                held.stop_judging()  # judged again at the next pause, on more speech
            case turn.SpeechResumed():
                self._set_state(State.USER_SPEAKING)
                self.replies.cancel_speculation()
                if self._stable is not None:
                    self._read_ahead(self._stable)
            case turn.TurnCommitted():
                self._on_commit(event)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.turns.agent_speaking(state == State.RESPONDING)
            self.io.emit(ev.SessionState(state.value))

    def _user_state(self) -> State:
        return {Phase.PAUSED: State.USER_PAUSED, Phase.SPEAKING: State.USER_SPEAKING}.get(self.turns.phase, State.LISTENING)

    def _check_idle(self) -> None:
        """After `idle_timeout_ms` of silence since a reply ended: ask whether the user is still
        there; after `idle_hangup_s` more, hang up."""
        idle = self.config.idle
        limit_ms = idle.idle_hangup_s * 1000 if self._asked_if_there else idle.idle_timeout_ms
        since = self._quiet_since
        if since is None or limit_ms <= 0 or (self.turns.frame_index - since) * FRAME_MS < limit_ms:
            return
        self._quiet_since = None
        self.io.emit(ev.TimeoutTriggered(self.utterance.new_item(), (since + 1) * FRAME_MS, (self.turns.frame_index + 1) * FRAME_MS))
        if self._asked_if_there:
            self.log.info("controller.idle_hangup", silent_s=round((self.turns.frame_index - since) * FRAME_MS / 1000, 2))
            self.io.close("idle_timeout")
            return
        self._asked_if_there = True
        prompt = self.replies.start(self.utterance.item_id, False, order=ev.ResponseOrder(say=idle.idle_prompt))
        self._set_state(State.RESPONDING)
        self.replies.commit_reply(prompt, self.turns.voice_end_at(), 0, {})

    def _on_speech_started(self, event: turn.SpeechStarted) -> None:
        self._quiet_since = None
        self._asked_if_there = False
        continuing = self.state == State.RESPONDING and self._barge_in()
        self._stable = None
        self.utterance.begin(event.audio, continued=continuing, on_stable=self._read_ahead)
        self.turns.utterance(event.audio, continued=continuing)
        self._set_state(State.OVERLAP if self.replies.held is not None else State.USER_SPEAKING)
        self.io.emit(ev.SpeechStarted(self.utterance.item_id, event.audio_start_ms))

    def _read_ahead(self, text: str) -> None:
        """The start of a long turn is known for good: the LM reads it while the user goes on. Not
        in a pause, which may be the turn's end: the end-of-turn judge and the speculation need
        the cores then (measured: a read-ahead of nearly the whole turn, started at its last pause,
        held its reply's first token to 1.8 s); the reading waits for the user to go on."""
        self._stable = text
        if self.create_response and self.state == State.USER_SPEAKING:
            self._stable = None
            self.replies.prefill(text)

    def _barge_in(self) -> bool:
        """The user speaks over the reply: hold it, paused, until the speech proves a turn or a
        backchannel (or stop it now, with `backchannel_max_ms` 0). Returns whether this speech
        continues the committed utterance instead: it came before the user heard `merge_heard_ms`
        of the reply, so the commit cut into a hesitation, and one utterance stays one user turn."""
        reply = self.replies.current
        if reply is not None and reply.cut_in():
            self.replies.take()
            reply.merge()
            self.counters.late_resumes += 1
            return True
        if reply is not None and self.config.interruption.backchannel_max_ms > 0:
            self.replies.hold(self.turns.frame_index)
            return False
        self.replies.interrupt("interrupted")
        self.counters.bargeins += 1
        return False

    def _heard_over_held(self, text: str | None) -> None:
        """At the first pause of the speech over the held reply: a backchannel, no words, or the
        reply's own words come back resume it; anything else is a barge-in, and the speech is the
        user's next turn."""
        if text is not None and (is_backchannel(text) or self._own_voice(text)):
            self._resume_held(text)
            return
        self._barge_in_over_held(State.USER_PAUSED, text)
        self.turns.new_pause()
        if self.create_response:
            self.replies.start(self.utterance.item_id, speculative=True)

    def _own_voice(self, text: str) -> bool:
        """Whether the speech over the held reply was its own words, come back through a client
        that does not cancel its echo (what the server's canceller and its guard let through)."""
        held = self.replies.held
        if held is None or not self.io.echo.enabled:
            return False
        if not is_own_voice(text, held.reply.said_around_heard(SAID_BEFORE_MS, SAID_AFTER_MS)):
            return False
        self.log.info("controller.own_voice_heard", response_id=held.reply.id, transcript=text)
        self.counters.own_voice += 1
        return True

    def _barge_in_over_held(self, then: State, transcript: str | None) -> None:
        held = self.replies.held
        if held is not None:
            self.log.info("controller.interrupted", response_id=held.reply.id, transcript=transcript)
            self.replies.end_held("interrupted", bargein=True)
            self._set_state(then)

    def _resume_held(self, text: str) -> None:
        self.turns.dismiss()
        self.replies.resume_held(self.utterance.item_id, text)
        self._set_state(State.RESPONDING)

    def _on_commit(self, event: turn.TurnCommitted) -> None:
        self.replies.end_held("interrupted", bargein=True)
        self.io.emit(ev.SpeechStopped(self.utterance.item_id, event.audio_end_ms))
        if not self.create_response:
            self.replies.cancel_speculation()  # started before `create_response` went off
            self._set_state(State.LISTENING)
            self._tasks.spawn(self._record_turn(self.utterance.item_id), f"user-turn:{self.utterance.item_id}")
            return
        self._set_state(State.RESPONDING)
        self.replies.commit(self.utterance.item_id, event.voice_end_at, self.config.interruption.merge_heard_ms, event.metrics())

    def _reply_ended(self, reply: Reply, held: bool) -> None:
        if held or (reply.committed and self.state == State.RESPONDING):
            self._set_state(self._user_state() if held else State.LISTENING)
        if reply.committed and self.state == State.LISTENING:
            self._quiet_since = self.turns.frame_index

    def on_client_event(self, event: ev.ClientEvent) -> None:
        match event:
            case ev.SessionUpdate():
                self._update_session(event)
            case ev.ResponseCancel():
                self._cancel()
            case ev.PlaybackPosition():
                self.io.playback.report(event.position_ms, event.response_id)
            case ev.ConversationItemTruncate():
                self.replies.truncate(event)
            case ev.InputAudioBufferCommit() if self.turns.in_turn:  # push-to-talk, or turn_detection `manual`
                self._on_commit(self.turns.commit_now("client"))
            case ev.InputAudioBufferCommit():
                self.io.emit(ev.Error("input_audio_buffer_commit_empty", "no speech to commit since the last turn", event.event_id))
            case ev.InputAudioBufferClear():
                self._clear()
                self.io.emit(ev.InputAudioBufferCleared())
            case ev.ConversationItemCreate() if event.respond:
                self._answer_typed(event.item)
            case ev.ConversationItemCreate():
                self._add_item(event)
            case ev.ConversationItemRetrieve() if (found := self.context.find(event.item_id)) is not None:
                self.io.emit(ev.ConversationItemRetrieved(_item(found).to_dict()))
            case ev.ConversationItemDelete() if self.context.delete(event.item_id):
                self.io.emit(ev.ConversationItemDeleted(event.item_id))
            case ev.ConversationItemRetrieve() | ev.ConversationItemDelete():
                self.io.emit(ev.Error("item_not_found", f"no item {event.item_id!r} in the history", event.event_id))
            case ev.ResponseCreate():
                self._respond(event)

    def _clear(self) -> None:
        if self.turns.in_turn and self.replies.held is not None:
            self._resume_held("")  # the speech was dropped: the reply it paused plays on
        elif self.turns.in_turn:
            self.replies.cancel_speculation()
            self.turns.dismiss()
            self._set_state(State.LISTENING)

    def _cancel(self) -> None:
        if self.replies.end_held("cancelled"):
            self._set_state(self._user_state())
        elif self.replies.current is not None and self.replies.current.committed:
            self.replies.interrupt("cancelled")
        else:
            self.replies.cancel_speculation()

    def _answer_typed(self, item: ev.Item) -> None:
        """A typed message is a committed turn of its own: whatever was under way ends."""
        self.replies.end_held("interrupted")
        if self.state == State.RESPONDING:
            self.replies.interrupt("interrupted")
        self.replies.cancel_speculation()
        typed = self.replies.start(self.utterance.new_item(item.id), False, UtteranceInput(item.text))
        self._set_state(State.RESPONDING)
        self.replies.commit_reply(typed, self.turns.voice_end_at(), self.config.interruption.merge_heard_ms, {})

    def _add_item(self, event: ev.ConversationItemCreate) -> None:
        """An item the client adds to the history, answered by nothing until a reply is asked for."""
        item = event.item
        if self.context.find(item.id) is not None:
            self.io.emit(ev.Error("item_already_exists", f"the history already holds an item {item.id!r}", event.event_id))
            return
        self.context.add(Turn(item.kind, item.text, "completed", item.id, call_id=item.call_id, name=item.name))
        self.io.emit(ev.ConversationItemCreated(item.to_dict()))

    def _respond(self, event: ev.ResponseCreate) -> None:
        """A reply to the conversation as it stands, asked for by the client: one at a time."""
        if self.replies.active:
            self.io.emit(ev.Error("conversation_already_has_active_response", "a reply is under way: cancel it or wait for its response.done", event.event_id))
            return
        self.replies.cancel_speculation()
        reply = self.replies.start(self.utterance.item_id, False, order=event.order)
        self._set_state(State.RESPONDING)
        self.replies.commit_reply(reply, self.turns.voice_end_at(), 0, {})

    async def _record_turn(self, item_id: str) -> None:
        """With `create_response` off, a committed turn is transcribed and kept, and not answered."""
        heard = await self.models.tokenizer.finalize()
        text = await heard.transcribe() if heard.transcribe is not None else heard.text
        if heard.empty:
            return
        self.io.emit(ev.TranscriptionCompleted(item_id, text))
        self.context.add(Turn("user", text.strip() or heard.lm_content or "", "completed", item_id))

    def _update_session(self, event: ev.SessionUpdate) -> None:
        try:
            self._apply_session(event.session)
        except ValueError as exc:
            self.io.emit(ev.Error("invalid_value", str(exc), event.event_id))
            return
        self.io.emit(ev.SessionUpdated(self._session_info()))

    def _apply_session(self, session: dict[str, Any]) -> None:
        """A `session.update`'s settings, all taken or (ValueError) none."""
        client_cancels, instructions = session.get(CLIENT_ECHO), session.get(INSTRUCTIONS)
        flags = {k: session[k] for k in (CREATE_RESPONSE, INTERRUPT_RESPONSE, TEXT_ONLY) if k in session}
        for key, value in ((CLIENT_ECHO, client_cancels), *flags.items()):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
        if instructions is not None and not isinstance(instructions, str):
            raise ValueError(f"{INSTRUCTIONS} must be a string")
        self.turns.reconfigure(self.config.with_session({k: v for k, v in session.items() if k not in CONTROLLER_SETTINGS}))
        if client_cancels is not None:
            self.io.echo.declare(client_cancels)
        if instructions is not None:
            self.context.system_prompt = instructions
        self.create_response = flags.get(CREATE_RESPONSE, self.create_response)
        self.interrupt_response = flags.get(INTERRUPT_RESPONSE, self.interrupt_response)
        self.replies.speak = not flags.get(TEXT_ONLY, not self.replies.speak)
        self.io.playback.buffer_ms = self.config.interruption.client_buffer_ms

    def _session_info(self) -> dict[str, Any]:
        return {
            "id": self.io.session_id,
            "profile": self.profile,
            "turn_detection": self.config.public(),
            "echo_cancellation": self.io.echo.enabled,
            INSTRUCTIONS: self.context.system_prompt,
            CREATE_RESPONSE: self.create_response,
            INTERRUPT_RESPONSE: self.interrupt_response,
            TEXT_ONLY: not self.replies.speak,
        }

    def _task_failed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        self.log.error("controller.task_failed", task=task.get_name(), error=repr(exc))
        why = str(exc) if isinstance(exc, StageStuck) else "see the server log"
        self.io.emit(ev.Error("server_error", f"the reply failed: {why}"))
        reply, held = self.replies.current, self.replies.held
        if reply is not None and reply.runs(task):
            self.replies.interrupt("cancelled")
        elif held is not None and held.reply.runs(task) and self.replies.end_held("cancelled"):
            self._set_state(self._user_state())

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return self._tasks.tasks

    async def _shutdown(self) -> None:
        # A hang-up (or a caller gone silent) mid-reply keeps what was heard, as a barge-in does.
        self.replies.end_held("interrupted")
        self.replies.interrupt("interrupted")
        await self._tasks.aclose()
        await self.models.tokenizer.aclose()
        self.log.info("controller.summary", state=self.state.value, **asdict(self.counters))


def _item(turn: Turn) -> ev.Item:
    status = "incomplete" if turn.status == "interrupted" else "completed"
    return ev.Item(turn.item_id, turn.role, turn.text, turn.call_id, turn.name, status)
