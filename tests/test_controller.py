"""The Controller with scripted VAD timelines and deterministic models: every turn-taking path."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from config import TurnConfig
from context.dialog import DialogContext, TranscriptStore
from controller.controller import Controller, SessionModels, State
from testkit.notifier import Notifier
from models.base import Message
from realtime.events import (
    ConversationItemCreate,
    ConversationItemTruncate,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    Item,
    PlaybackPosition,
    ResponseCancel,
    ServerEvent,
    SessionUpdate,
)
from realtime.echo import EchoCanceller
from realtime.output import PacedOutput
from realtime.session import SessionIO
from runtime.bridge import thread_stream
from runtime.workers import ModelWorker
from tests.fakes import SILENT, VOICED, CountingTokenizer, CuedLM, GatedPromptCache, ScriptedDetector, ToneDecoder

pytestmark = pytest.mark.unit


@dataclass
class Rig:
    controller: Controller
    output: PacedOutput
    lm: CuedLM
    decoder: ToneDecoder
    tokenizer: CountingTokenizer
    notifier: Notifier
    store: TranscriptStore
    events: list[dict] = field(default_factory=list)

    def frames(self, voiced: bool, count: int) -> None:
        for _ in range(count):
            self.controller.on_frame(VOICED if voiced else SILENT)

    async def answered_turn(self) -> dict:
        """A spoken turn, committed (vad timing) and its reply played to the end."""
        self.frames(True, 40)
        self.frames(False, 38)
        return await self.play_until_done()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, event_type: str) -> list[dict]:
        return [e for e in self.events if e["type"] == event_type]

    async def until(self, predicate, timeout: float = 5.0):
        return await self.notifier.wait_for(predicate, timeout)

    def play(self, frames: int) -> list[np.ndarray]:
        """The transport's side: send `frames` 20 ms frames of whatever is queued."""
        return [self.output.next_frame() for _ in range(frames)]

    async def play_until_done(self, status: str = "completed", limit: int = 2000) -> dict:
        """Play frames (yielding to the reply task between them) until a new response.done arrives."""
        seen = len(self.of("response.done"))
        for _ in range(limit):
            self.output.next_frame()
            await asyncio.sleep(0)
            done = self.of("response.done")
            if len(done) > seen:
                assert done[-1]["response"]["status"] == status, done[-1]
                return done[-1]
        raise AssertionError(f"no response.done {status}: {self.types()}")


@pytest.fixture
def rig(tmp_path) -> Rig:
    return make_rig(tmp_path)


def make_rig(
    tmp_path, hold: bool = False, config: TurnConfig | None = None, turn_end=None, lm=None, echo: EchoCanceller | None = None, prompt_cache=None
) -> Rig:
    notifier = Notifier()
    events: list[dict] = []
    output = PacedOutput(48000)

    def emit(event: ServerEvent) -> None:
        events.append(event.to_dict())
        notifier.notify()

    io = SessionIO("sess_test", asyncio.Queue(), output, emit, echo or EchoCanceller("off"))
    model = lm
    lm, decoder, tokenizer = CuedLM(notifier, hold=hold), ToneDecoder(notifier), CountingTokenizer(notifier)
    store = TranscriptStore(tmp_path)
    context = DialogContext("You are terse.", max_tokens=500, store=store, session_id="sess_test")
    controller = Controller(
        io, SessionModels(ScriptedDetector(), tokenizer, model or lm, decoder, turn_end, prompt_cache=prompt_cache), context, config or TurnConfig(), "test"
    )
    return Rig(controller, output, lm, decoder, tokenizer, notifier, store, events)


async def test_a_long_turn_s_stable_start_is_read_ahead_and_its_reply_waits_for_that(tmp_path):
    """While the user goes on, the start of their turn that the tokenizer says is stable goes to
    the LM's prompt cache with the history before it; the reply's own prompt goes in only once that
    is done (else both would evaluate it, side by side)."""
    notifier = Notifier()
    cache = GatedPromptCache(notifier)
    rig = make_rig(tmp_path, prompt_cache=cache)
    await rig.answered_turn()  # a history before the turn
    rig.frames(True, 40)
    assert rig.tokenizer.on_stable is not None
    rig.tokenizer.on_stable("the first part")
    await notifier.wait_for(lambda: cache.prefills, timeout=5)
    rig.frames(False, 38)  # the pause, the commit
    await rig.notifier.wait_for(lambda: len(rig.tokenizer.finalized) == 2, timeout=5)
    with pytest.raises(TimeoutError):
        await rig.notifier.wait_for(lambda: len(rig.lm.calls) == 2, timeout=0.3)
    cache.gate.set()
    await rig.play_until_done()
    read_ahead, asked = cache.prefills[0], rig.lm.calls[1]
    assert read_ahead[-1] == Message("user", "the first part")
    assert read_ahead[:-1] == asked[:-1] and len(asked) == 4  # the system prompt and the first turn's two messages
    assert cache.done == 1 and len(cache.prefills) == 1


async def test_a_stable_start_known_in_a_pause_is_read_ahead_once_the_user_goes_on(tmp_path):
    """A pause may be the turn's end: the judge and the speculation have the cores, and the
    reading ahead waits until the user speaks again."""
    notifier = Notifier()
    cache = GatedPromptCache(notifier)
    cache.gate.set()
    rig = make_rig(tmp_path, prompt_cache=cache)
    rig.frames(True, 40)
    rig.frames(False, 15)  # paused (260 ms), not committed
    assert rig.controller.state == State.USER_PAUSED and rig.tokenizer.on_stable is not None
    rig.tokenizer.on_stable("the first part")
    with pytest.raises(TimeoutError):
        await notifier.wait_for(lambda: cache.prefills, timeout=0.2)
    rig.frames(True, 10)
    assert rig.controller.state == State.USER_SPEAKING
    await notifier.wait_for(lambda: cache.done, timeout=5)
    assert [m[-1].content for m in cache.prefills] == ["the first part"]


async def test_a_normal_turn(rig):
    rig.frames(False, 10)
    rig.frames(True, 40)
    assert rig.controller.state == State.USER_SPEAKING
    started = rig.of("input_audio_buffer.speech_started")[0]
    # Onset after 150 ms of speech, keeping 300 ms of audio before it.
    assert started["audio_start_ms"] == 0
    rig.frames(False, 38)  # 760 ms of silence: paused at 260 ms, committed at 760 ms
    assert rig.controller.state == State.RESPONDING
    done = await rig.play_until_done()
    assert done["response"]["output_text"] == rig.lm.reply
    assert len(rig.lm.calls) == 1
    assert rig.controller.state == State.LISTENING
    order = [t for t in rig.types() if t.startswith(("input_audio", "conversation", "response"))]
    assert order[:5] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "response.created",
        "conversation.item.input_audio_transcription.completed",
        "response.text.delta",
    ]
    assert "response.audio.started" in order and order[-1] == "response.done"
    metrics = rig.of("metrics.turn")[0]
    assert metrics["endpoint_ms"] == 760 and metrics["speculative"] is True
    assert {"asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms"} <= set(metrics)
    history = [(t.role, t.status) for t in rig.controller.context.turns]
    assert history == [("user", "completed"), ("assistant", "completed")]
    stored = rig.store.read("sess_test")
    assert [r["role"] for r in stored] == ["user", "assistant"] and stored[1]["text"] == rig.lm.reply


async def test_pause_then_resume_cancels_the_speculation_unheard_and_unstored(tmp_path):
    rig = make_rig(tmp_path, hold=True)
    rig.frames(True, 30)
    rig.frames(False, 13)  # paused: speculation starts
    assert rig.controller.state == State.USER_PAUSED
    await rig.until(lambda: rig.lm.calls)
    rig.lm.release(3)
    await rig.until(lambda: rig.decoder.chunks >= 3)
    rig.frames(True, 3)  # 60 ms of speech again: resumed
    await rig.until(lambda: rig.lm.cancelled == 1)
    assert rig.controller.state == State.USER_SPEAKING
    assert rig.output.queued_ms == 0 and rig.output.audio_frames_sent == 0
    assert not rig.of("response.created") and not rig.of("response.text.delta")
    assert rig.controller.context.turns == []
    assert rig.controller.counters.speculative_cancels == 1
    # The next pause speculates afresh over the whole utterance, and this one commits.
    rig.frames(True, 10)
    rig.lm.hold = False
    rig.frames(False, 38)
    await rig.play_until_done()
    assert len(rig.lm.calls) == 2
    assert rig.tokenizer.finalized[1] > rig.tokenizer.finalized[0] + 12
    assert rig.controller.counters.speculative_commits == 1


async def test_pause_then_commit_plays_the_buffer_at_once_with_one_lm_call(rig):
    rig.frames(True, 30)
    rig.frames(False, 13)  # paused
    await rig.until(lambda: rig.decoder.chunks == len(rig.lm.reply.split()))
    assert rig.output.queued_ms == 0  # fully synthesized, nothing played
    rig.frames(False, 24)  # one frame short of the commit
    assert rig.output.queued_ms == 0 and rig.controller.state == State.USER_PAUSED
    rig.frames(False, 1)  # the commit frame
    assert rig.controller.state == State.RESPONDING
    assert rig.output.queued_ms == pytest.approx(200 * len(rig.lm.reply.split()), abs=25)
    first = rig.play(1)[0]
    assert np.abs(first).max() > 0  # the very next frame carries the reply
    await rig.play_until_done()
    assert len(rig.lm.calls) == 1 and rig.controller.counters.speculative_commits == 1


async def spoken_over(rig: Rig, reply: str = "one two three four five six seven eight nine ten") -> None:
    """A turn whose 2 s reply is ready, 1.5 s of it sent."""
    rig.lm.reply = reply
    rig.frames(True, 30)
    rig.frames(False, 38)
    await rig.until(lambda: rig.decoder.chunks == len(reply.split()))
    rig.play(75)
    await rig.until(lambda: rig.of("response.audio.started"))


async def test_barge_in_keeps_only_what_was_heard(rig):
    await spoken_over(rig)
    rig.frames(True, 1)  # 20 ms: not yet enough to pause the agent (40 ms)
    assert np.any(rig.output.next_frame())
    rig.frames(True, 1)
    assert rig.of("response.audio.paused") and np.all(rig.output.next_frame() == 0)  # silent at once
    rig.frames(True, 7)  # 180 ms: below the barge-in minimum (200 ms)
    assert rig.controller.state == State.RESPONDING
    rig.frames(True, 1)
    assert rig.controller.state == State.OVERLAP
    assert not rig.of("response.done")  # held, paused: it might be a backchannel
    rig.frames(True, 39)  # 980 ms of speech: still could be one
    assert not rig.of("response.done")
    rig.frames(True, 1)  # over backchannel_max_ms (1000): a barge-in
    done = rig.of("response.done")[-1]["response"]
    assert done["status"] == "interrupted"
    # 1520 ms sent (one more frame before the pause) minus the 120 ms the client is assumed to
    # buffer: 1400 ms = 7 words of 200 ms.
    assert done["output_text"] == "one two three four five six seven"
    assert np.all(rig.output.next_frame() == 0)  # flushed
    assistant = rig.controller.context.turns[-1]
    assert (assistant.role, assistant.status, assistant.text) == ("assistant", "interrupted", done["output_text"])
    assert rig.controller.counters.bargeins == 1 and rig.controller.counters.resumes == 0
    # The interrupting speech is kept: the new utterance starts with its onset audio.
    assert rig.tokenizer.frames >= 50


async def test_without_backchannels_confirmed_speech_is_a_barge_in_at_once(tmp_path):
    rig = make_rig(tmp_path, config=TurnConfig().updated({"type": "vad", "backchannel_max_ms": 0}))
    await spoken_over(rig)
    rig.frames(True, 10)
    assert rig.controller.state == State.USER_SPEAKING
    assert rig.of("response.done")[-1]["response"]["status"] == "interrupted"
    assert rig.controller.counters.bargeins == 1


async def test_a_click_over_the_agent_pauses_it_and_it_plays_on(rig):
    await spoken_over(rig)
    rig.frames(True, 2)
    assert np.all(rig.output.next_frame() == 0)
    rig.frames(False, 3)  # too short to be speech: the onset is dropped
    assert rig.of("response.audio.resumed")[-1] == {
        "type": "response.audio.resumed", "response_id": rig.of("response.created")[0]["response"]["id"],
        "item_id": None, "transcript": "",
    }
    assert np.any(rig.output.next_frame())
    done = await rig.play_until_done()
    assert done["response"]["output_text"] == rig.lm.reply
    assert rig.controller.counters.bargeins == 0


async def test_a_backchannel_over_the_agent_lets_it_resume_where_it_paused(rig):
    await spoken_over(rig)
    sent = rig.output.audio_frames_sent
    rig.tokenizer.transcript = "Mm-hmm."
    rig.frames(True, 20)  # 400 ms of speech: confirmed, held
    assert rig.controller.state == State.OVERLAP
    rig.frames(False, 13)  # its pause: judged
    resumed = await rig.until(lambda: rig.of("response.audio.resumed"))
    item = rig.of("input_audio_buffer.speech_started")[-1]["item_id"]
    assert (resumed[0]["item_id"], resumed[0]["transcript"]) == (item, "Mm-hmm.")
    assert rig.controller.state == State.RESPONDING
    assert rig.output.audio_frames_sent == sent  # nothing went out while paused, nothing was dropped
    assert np.any(rig.output.next_frame())
    rig.frames(False, 100)  # the silence after it commits nothing: it was not a turn
    assert len(rig.of("response.created")) == 1
    done = await rig.play_until_done()
    assert done["response"]["output_text"] == rig.lm.reply
    assert [(t.role, t.status) for t in rig.controller.context.turns] == [("user", "completed"), ("assistant", "completed")]
    counters = rig.controller.counters
    assert (counters.resumes, counters.bargeins, counters.responses) == (1, 0, 1)
    assert not rig.of("conversation.item.input_audio_transcription.completed")[1:]


async def test_words_over_the_agent_are_a_barge_in_at_their_pause(rig):
    await spoken_over(rig)
    rig.tokenizer.transcript = "Okay, but what about Paris?"
    rig.frames(True, 20)
    rig.frames(False, 13)
    done = await rig.until(lambda: rig.of("response.done"))
    assert done[0]["response"]["status"] == "interrupted"
    assert rig.controller.counters.bargeins == 1 and rig.controller.state == State.USER_PAUSED
    rig.frames(False, 25)  # the new utterance is answered as usual
    await rig.play_until_done()
    turns = rig.controller.context.turns
    assert [(t.role, t.status) for t in turns] == [
        ("user", "completed"), ("assistant", "interrupted"), ("user", "completed"), ("assistant", "completed")
    ]
    assert turns[2].text == "Okay, but what about Paris?"
    # The new reply's prompt already holds what was heard of the interrupted one.
    assert rig.lm.calls[-1][-2].content == turns[1].text


async def test_with_create_response_off_words_over_the_agent_stop_it_and_are_only_kept(rig):
    await spoken_over(rig)
    rig.controller.on_client_event(SessionUpdate({"create_response": False}))
    rig.tokenizer.transcript = "Wait, stop."
    rig.frames(True, 20)
    rig.frames(False, 13)
    done = await rig.until(lambda: rig.of("response.done"))
    assert done[0]["response"]["status"] == "interrupted"
    rig.frames(False, 25)
    await rig.until(lambda: rig.of("conversation.item.input_audio_transcription.completed")[1:])
    assert len(rig.of("response.created")) == 1 and len(rig.lm.calls) == 1
    assert rig.controller.counters.speculative_starts == 1  # the first turn's, none over the reply
    assert rig.controller.state == State.LISTENING and rig.controller.replies.current is None
    assert [(t.role, t.status) for t in rig.controller.context.turns][-1] == ("user", "completed")


async def test_create_response_turned_off_in_a_pause_drops_the_reply_being_prepared(rig):
    rig.frames(True, 30)
    rig.frames(False, 13)
    assert rig.controller.state == State.USER_PAUSED and rig.controller.replies.current is not None
    rig.controller.on_client_event(SessionUpdate({"create_response": False}))
    rig.frames(False, 25)
    await rig.until(lambda: rig.of("conversation.item.input_audio_transcription.completed"))
    assert not rig.of("response.created") and rig.controller.replies.current is None
    assert rig.controller.counters.speculative_cancels == 1


@pytest.mark.parametrize(
    "server_cancels, transcript, own",
    [
        (True, "Six, seven.", True),  # the reply's last words come back as the client heard them
        (True, "Three for five", True),  # misheard, mostly its own
        (True, "Wait, what about seven?", False),  # the user, with a word of the reply
        (True, "Seven?", False),  # one word: judged as any other speech
        (False, "Six, seven.", False),  # the client cancels its echo: that was the user
    ],
)
async def test_the_reply_s_own_words_come_back_are_not_a_barge_in(tmp_path, server_cancels, transcript, own):
    rig = make_rig(tmp_path, echo=EchoCanceller("on" if server_cancels else "off"))
    await spoken_over(rig)  # 1.5 s sent, 1.4 s heard: "one" to "seven"
    rig.tokenizer.transcript = transcript
    rig.frames(True, 20)
    rig.frames(False, 13)
    if own:
        resumed = await rig.until(lambda: rig.of("response.audio.resumed"))
        assert resumed[0]["transcript"] == transcript and rig.controller.state == State.RESPONDING
        done = await rig.play_until_done()
        assert done["response"]["output_text"] == rig.lm.reply
        assert [t.role for t in rig.controller.context.turns] == ["user", "assistant"]  # the echo is no turn
        assert (rig.controller.counters.own_voice, rig.controller.counters.bargeins) == (1, 0)
    else:
        done = await rig.until(lambda: rig.of("response.done"))
        assert done[0]["response"]["status"] == "interrupted"
        assert (rig.controller.counters.own_voice, rig.controller.counters.bargeins) == (0, 1)


async def test_cancel_while_speech_is_judged_ends_the_held_reply(rig):
    await spoken_over(rig)
    rig.frames(True, 20)
    rig.controller.on_client_event(ResponseCancel())
    assert rig.of("response.done")[-1]["response"]["status"] == "cancelled"
    assert rig.controller.counters.bargeins == 0
    assert np.all(rig.output.next_frame() == 0)


async def test_barge_in_uses_the_clients_playback_position(rig):
    await spoken_over(rig)
    response_id = rig.of("response.created")[0]["response"]["id"]
    rig.controller.on_client_event(
        PlaybackPosition(position_ms=650.0, response_id=response_id)
    )
    rig.frames(True, 60)
    assert rig.of("response.done")[-1]["response"]["output_text"] == "one two three"


async def test_speech_during_speculation_cancels_mid_generation(tmp_path):
    rig = make_rig(tmp_path, hold=True)
    rig.frames(True, 30)
    rig.frames(False, 13)
    await rig.until(lambda: rig.lm.calls)
    rig.lm.release(2)
    await rig.until(lambda: rig.lm.yielded == 2)
    rig.frames(True, 3)
    await rig.until(lambda: rig.lm.cancelled == 1)
    await asyncio.gather(*rig.controller.tasks, return_exceptions=True)
    assert all(task.done() for task in rig.controller.tasks)
    assert rig.output.audio_frames_sent == 0 and rig.controller.context.turns == []


async def test_rapid_consecutive_turns(rig):
    for _ in range(2):
        rig.frames(True, 25)
        rig.frames(False, 38)
        assert rig.controller.state == State.RESPONDING
        # The user goes on before the commit was even transcribed: the same utterance continues.
        rig.frames(True, 10)
        assert rig.controller.state == State.USER_SPEAKING
        rig.frames(False, 38)
        await rig.play_until_done()
    # Straight away, a third turn: speech right after the second reply ended.
    rig.frames(True, 25)
    rig.frames(False, 38)
    await rig.play_until_done()
    statuses = [e["response"]["status"] for e in rig.of("response.done")]
    assert statuses == ["interrupted", "completed", "interrupted", "completed", "completed"]
    turns = rig.controller.context.turns
    assert [t.role for t in turns] == ["user", "assistant"] * 3
    # Each continued utterance was transcribed whole: 25 + 38 + 10 + 38 frames and the onset audio.
    assert turns[0].text == turns[2].text and int(turns[0].text.split()[2]) >= 111
    assert rig.controller.counters.late_resumes == 2 and rig.controller.counters.bargeins == 0


@pytest.mark.parametrize("target", [State.LISTENING, State.USER_SPEAKING, State.USER_PAUSED, State.RESPONDING])
async def test_hang_up_in_every_state_leaves_no_task(tmp_path, target):
    rig = make_rig(tmp_path, hold=True)
    frames: asyncio.Queue = rig.controller.io.frames
    runner = asyncio.create_task(rig.controller.run())
    script = {
        State.LISTENING: [],
        State.USER_SPEAKING: [(True, 20)],
        State.USER_PAUSED: [(True, 20), (False, 13)],
        State.RESPONDING: [(True, 20), (False, 38)],
    }[target]
    for voiced, count in script:
        for _ in range(count):
            frames.put_nowait(VOICED if voiced else SILENT)
    await rig.until(lambda: rig.controller.state == target and frames.empty())
    if target in (State.USER_PAUSED, State.RESPONDING):
        await rig.until(lambda: rig.lm.calls)  # the LM is mid-generation, waiting for a cue
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert not rig.controller.tasks
    assert rig.lm.cancelled == len(rig.lm.calls)


async def test_session_update_changes_thresholds_live(rig):
    rig.controller.on_client_event(
        SessionUpdate({"turn_detection": {"commit_ms": 400, "pause_ms": 200}})
    )
    updated = rig.of("session.updated")[0]["session"]["turn_detection"]
    assert (updated["commit_ms"], updated["pause_ms"]) == (400, 200)
    rig.frames(True, 30)
    rig.frames(False, 19)
    assert rig.controller.state == State.USER_PAUSED
    rig.frames(False, 1)  # 400 ms
    assert rig.controller.state == State.RESPONDING


@pytest.mark.parametrize(
    "session",
    [
        {"turn_detection": {"commit_ms": "soon"}},
        {"turn_detection": {"commit_ms": 100, "pause_ms": 250}},
        {"turn_detection": {"threshold": 2}},
        {"turn_detection": {"pause_ms": True}},
        {"turn_detection": {"warp": 9}},
        {"turn_detection": []},
        {"voice": "alloy"},
    ],
)
async def test_malformed_session_update_is_refused_and_changes_nothing(rig, session):
    before = rig.controller.config
    rig.controller.on_client_event(SessionUpdate(session, event_id="evt_1"))
    error = rig.of("error")[-1]["error"]
    assert error["code"] == "invalid_value" and error["event_id"] == "evt_1"
    assert rig.controller.config == before and not rig.of("session.updated")


async def test_typed_message_gets_a_reply_and_cancel_stops_it(rig):
    rig.controller.on_client_event(
        ConversationItemCreate(Item("typed_1", "user", "What time is it?"))
    )
    await rig.until(lambda: rig.decoder.chunks >= 2)
    assert rig.lm.calls[0][-1].content == "What time is it?"
    # The turn is in the prompt once, though it was committed before the reply started.
    assert [m.role for m in rig.lm.calls[0]] == ["system", "user"]
    rig.play(3)
    rig.controller.on_client_event(ResponseCancel())
    assert rig.of("response.done")[-1]["response"]["status"] == "cancelled"
    assert rig.controller.state == State.LISTENING
    assert np.all(rig.output.next_frame() == 0)


async def test_a_turn_without_transcript_keeps_its_lm_content_in_the_history(rig):
    rig.tokenizer.audio_tokens = True
    rig.frames(False, 10)
    rig.frames(True, 40)
    rig.frames(False, 38)
    await rig.play_until_done()
    audio = rig.lm.calls[0][-1].content
    assert audio.startswith("<audio_0><audio_1>")
    assert rig.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == ""
    assert [(t.role, t.text) for t in rig.controller.context.turns][0] == ("user", audio)


async def test_a_transcript_made_beside_the_reply_does_not_delay_it(rig):
    rig.tokenizer.transcript_gate = gate = asyncio.Event()
    rig.frames(False, 10)
    rig.frames(True, 40)
    rig.frames(False, 38)
    # The reply streams while the transcript is still being made.
    await rig.until(lambda: rig.decoder.chunks >= 1 and rig.tokenizer.transcribing == 1)
    assert rig.lm.calls[0][-1].content.startswith("<audio_0>")
    assert not rig.of("conversation.item.input_audio_transcription.completed")
    gate.set()
    await rig.play_until_done()
    completed = rig.of("conversation.item.input_audio_transcription.completed")
    assert completed and completed[0]["transcript"].startswith("utterance of")
    assert [t.role for t in rig.controller.context.turns] == ["user", "assistant"]
    assert rig.controller.context.turns[0].text == completed[0]["transcript"]


async def test_barge_in_before_the_transcript_keeps_the_history_in_order(rig):
    rig.tokenizer.transcript_gate = gate = asyncio.Event()
    rig.frames(False, 10)
    rig.frames(True, 40)
    rig.frames(False, 38)
    await rig.until(lambda: rig.decoder.chunks >= 2)
    rig.play(40)  # 800 ms of the reply sent, 680 ms heard: past the 500 ms that would continue the turn
    rig.frames(True, 60)  # the user talks over it (1.2 s) before the transcript is back
    assert rig.of("response.done")[-1]["response"]["status"] == "interrupted"
    assert rig.controller.context.turns == []  # the reply's turn waits for the user's
    gate.set()
    await rig.until(lambda: len(rig.controller.context.turns) == 2)
    assert [(t.role, t.status) for t in rig.controller.context.turns] == [("user", "completed"), ("assistant", "interrupted")]


async def test_a_cancelled_speculation_cancels_its_transcript(tmp_path):
    rig = make_rig(tmp_path)
    rig.tokenizer.transcript_gate = asyncio.Event()
    rig.frames(False, 10)
    rig.frames(True, 40)
    rig.frames(False, 15)  # 300 ms: the speculative reply starts, its transcript with it
    await rig.until(lambda: rig.tokenizer.transcribing == 1)
    transcripts = [t for t in rig.controller.tasks if "transcript:" in t.get_name()]
    assert len(transcripts) == 1
    rig.frames(True, 20)  # the user goes on: the speculation and its transcript are dropped
    await asyncio.wait(transcripts, timeout=5)
    assert transcripts[0].cancelled()


def test_a_line_torn_by_a_crash_leaves_the_turns_before_it_readable(tmp_path):
    store = TranscriptStore(tmp_path)
    store.append("sess_a", {"role": "user", "text": "hi"})
    store.append("sess_a", {"role": "assistant", "text": "hello"})
    with store.path("sess_a").open("ab") as f:
        f.write(b'{"role": "user", "text": "how ar\xe2')  # killed mid-write, mid-character
    assert [r["text"] for r in store.read("sess_a")] == ["hi", "hello"]


def test_transcript_store_refuses_path_tricks(tmp_path):
    store = TranscriptStore(tmp_path)
    assert store.read("../../etc/passwd") is None
    store.append("sess_a", {"role": "user", "text": "hi"})
    assert json.loads((tmp_path / "sessions" / "sess_a.jsonl").read_text())["text"] == "hi"


async def test_speech_resuming_before_the_reply_is_heard_continues_the_same_utterance(rig):
    rig.frames(True, 25)
    rig.frames(False, 38)  # committed
    first = await rig.until(lambda: rig.of("conversation.item.input_audio_transcription.completed"))
    await rig.until(lambda: rig.decoder.chunks >= 1)  # the reply is ready, but nothing went out yet
    assert rig.output.audio_frames_sent == 0
    rig.frames(True, 10)  # the user goes on: a hesitation the commit mistook for the end
    assert rig.controller.state == State.USER_SPEAKING
    assert rig.controller.counters.late_resumes == 1 and rig.controller.counters.bargeins == 0
    assert rig.controller.context.turns == []  # the first half never became a turn of its own
    rig.frames(False, 38)
    await rig.play_until_done()
    completed = rig.of("conversation.item.input_audio_transcription.completed")
    assert len(completed) == 2 and completed[0]["item_id"] == completed[1]["item_id"] == first[0]["item_id"]
    turns = rig.controller.context.turns
    assert [t.role for t in turns] == ["user", "assistant"]
    # One user turn, transcribed whole: both parts and the pause between them.
    assert turns[0].text == completed[1]["transcript"] and int(turns[0].text.split()[2]) >= 25 + 38 + 10
    assert len(rig.lm.calls) == 2 and rig.lm.calls[1][-1].content == turns[0].text


async def test_speech_soon_after_the_reply_starts_continues_the_same_utterance(rig):
    rig.frames(True, 25)
    rig.frames(False, 38)  # committed
    first = await rig.until(lambda: rig.of("conversation.item.input_audio_transcription.completed"))
    await rig.until(lambda: rig.decoder.chunks >= 2)
    rig.play(25)  # 500 ms sent, 380 ms heard: the commit cut into a hesitation
    rig.frames(True, 10)
    assert rig.controller.state == State.USER_SPEAKING
    assert rig.controller.counters.late_resumes == 1 and rig.controller.counters.bargeins == 0
    dropped = rig.of("response.done")[-1]["response"]
    assert (dropped["status"], dropped["output_text"]) == ("interrupted", "")
    assert rig.controller.context.turns == [] and np.all(rig.output.next_frame() == 0)
    rig.frames(False, 38)
    await rig.play_until_done()
    completed = rig.of("conversation.item.input_audio_transcription.completed")
    assert [c["item_id"] for c in completed] == [first[0]["item_id"]] * 2
    assert [t.role for t in rig.controller.context.turns] == ["user", "assistant"]


async def test_hang_up_while_speech_over_the_agent_is_judged_leaves_no_task(tmp_path):
    rig = make_rig(tmp_path)
    runner = asyncio.create_task(rig.controller.run())
    await spoken_over(rig)
    rig.tokenizer.transcript_gate = asyncio.Event()  # the judging transcript never comes
    rig.frames(True, 20)
    rig.frames(False, 13)
    await rig.until(lambda: rig.tokenizer.transcribing == 1)
    assert any("interruption:" in t.get_name() for t in rig.controller.tasks)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert not rig.controller.tasks


async def test_manual_turns_wait_for_the_clients_commit(tmp_path):
    rig = make_rig(tmp_path, config=TurnConfig().updated({"type": "manual"}))
    rig.controller.on_client_event(InputAudioBufferCommit(event_id="c0"))
    assert rig.of("error")[-1]["error"]["code"] == "input_audio_buffer_commit_empty"
    rig.frames(True, 30)
    rig.frames(False, 200)  # four seconds of silence: the server commits nothing itself
    assert rig.controller.state == State.USER_PAUSED and not rig.of("input_audio_buffer.speech_stopped")
    rig.controller.on_client_event(InputAudioBufferCommit())
    assert rig.controller.state == State.RESPONDING
    assert rig.of("metrics.turn") == [] and rig.of("input_audio_buffer.speech_stopped")
    done = await rig.play_until_done()
    assert done["response"]["output_text"] == rig.lm.reply and len(rig.lm.calls) == 1
    assert rig.of("metrics.turn")[0]["commit_rule"] == "client"


async def test_a_commit_while_the_user_still_speaks_ends_the_turn_there(rig):
    rig.frames(True, 30)
    assert rig.controller.state == State.USER_SPEAKING
    rig.controller.on_client_event(InputAudioBufferCommit())  # push-to-talk released mid-word
    assert rig.controller.state == State.RESPONDING
    await rig.play_until_done()
    assert [(t.role, t.status) for t in rig.controller.context.turns] == [("user", "completed"), ("assistant", "completed")]


async def test_clear_drops_the_speech_and_its_speculation(rig):
    rig.frames(True, 30)
    rig.frames(False, 15)  # paused: a speculative reply is being prepared
    assert rig.controller.state == State.USER_PAUSED and rig.controller.replies.current is not None
    rig.controller.on_client_event(InputAudioBufferClear())
    assert rig.controller.state == State.LISTENING and rig.controller.replies.current is None
    rig.frames(False, 100)
    counters = rig.controller.counters
    assert (counters.speculative_cancels, counters.responses) == (1, 0)
    assert rig.controller.context.turns == [] and rig.store.read("sess_test") in (None, [])
    rig.frames(True, 30)  # the next speech is a turn of its own
    rig.frames(False, 38)
    assert rig.controller.state == State.RESPONDING


async def test_truncate_after_the_reply_ended_cuts_its_history_back(rig):
    await spoken_over(rig)  # a reply of 200 ms words, 1.5 s of it sent
    response_id = rig.of("response.created")[0]["response"]["id"]
    rig.controller.on_client_event(ResponseCancel())
    kept = rig.of("response.done")[-1]["response"]["output_text"]
    assert kept.split()[:3] == ["one", "two", "three"] and len(kept.split()) > 3
    rig.controller.on_client_event(ConversationItemTruncate(response_id, 650.0))  # the client played 650 ms
    truncated = rig.of("conversation.item.truncated")[-1]
    assert truncated["transcript"] == "one two three"
    assert rig.controller.context.turns[-1].text == "one two three"
    assert [r["text"] for r in rig.store.read("sess_test") if r["role"] == "assistant"] == ["one two three"]
    rig.controller.on_client_event(ConversationItemTruncate("resp_nope", 10.0, event_id="t1"))
    assert rig.of("error")[-1]["error"]["code"] == "item_not_found"


async def test_truncate_while_the_reply_plays_sets_what_an_interruption_keeps(rig):
    await spoken_over(rig)
    response_id = rig.of("response.created")[0]["response"]["id"]
    rig.controller.on_client_event(ConversationItemTruncate(response_id, 450.0))
    rig.controller.on_client_event(ResponseCancel())
    assert rig.of("response.done")[-1]["response"]["output_text"] == "one two"


async def test_every_reply_ends_once_and_its_done_future_says_how(rig):
    rig.frames(True, 30)
    rig.frames(False, 13)  # paused: a speculation
    speculation = rig.controller.replies.current
    rig.frames(True, 3)  # resumed: it is dropped, unannounced
    assert await asyncio.wait_for(speculation.done, 5) == "cancelled" and not rig.of("response.done")
    rig.frames(True, 10)
    rig.frames(False, 38)
    first = rig.controller.replies.current
    await rig.play_until_done()
    assert first.done.result() == "completed"
    metrics = rig.of("metrics.turn")[-1]
    assert metrics["response_id"] == first.id and not [key for key in metrics if key.startswith("_")]
    chunks = rig.decoder.chunks
    rig.frames(True, 30)
    rig.frames(False, 38)
    second = rig.controller.replies.current
    await rig.until(lambda: rig.decoder.chunks > chunks)
    rig.play(5)
    rig.controller.on_client_event(ResponseCancel())
    assert second.done.result() == "cancelled"
    second.interrupt("interrupted")  # a second end changes nothing
    assert [e["response"]["id"] for e in rig.of("response.done")] == [first.id, second.id]


class StuckOnceLM:
    """An LM in a worker thread whose first generation hangs after its first word (as a wedged
    engine would), and whose later ones answer."""

    calls_tools = False

    def __init__(self) -> None:
        self.worker = ModelWorker("stuck-lm", threads=2, stuck_after_s=0.3)
        self.hung = threading.Event()
        self.calls = 0

    def stream(self, messages, max_new_tokens=None, tools=None):
        self.calls += 1
        hangs = self.calls == 1

        def produce(post, stop: threading.Event) -> None:
            post("Well")
            if hangs:
                self.hung.wait()
            else:
                post(" hello there.")

        return thread_stream(self.worker, produce)


async def test_a_stage_that_hangs_fails_its_reply_with_an_error_and_the_next_turn_is_answered(tmp_path):
    lm = StuckOnceLM()
    rig = make_rig(tmp_path, lm=lm)
    try:
        rig.frames(True, 30)
        rig.frames(False, 38)
        error = await rig.until(lambda: rig.of("error"))
        assert "stuck-lm: a call gave no answer in 0.3 s" in error[0]["error"]["message"]
        await rig.until(lambda: rig.of("response.done"))
        assert rig.of("response.done")[0]["response"]["status"] == "cancelled"
        assert rig.controller.state == State.LISTENING
        rig.frames(True, 30)
        rig.frames(False, 38)
        done = await rig.play_until_done()
        assert done["response"]["output_text"] == "Well hello there." and lm.worker.given_up == 1
    finally:
        lm.hung.set()
        lm.worker.close()


def _idle_rig(tmp_path, timeout_ms: int, hangup_s: float) -> tuple[Rig, list[str]]:
    config = TurnConfig().updated({"idle_timeout_ms": timeout_ms})
    rig = make_rig(tmp_path, config=replace(config, idle=replace(config.idle, idle_hangup_s=hangup_s)))
    closed: list[str] = []
    rig.controller.io.close = closed.append
    return rig, closed


async def test_a_silent_user_is_asked_if_still_there_then_hung_up_on(tmp_path):
    rig, closed = _idle_rig(tmp_path, 2000, 3.0)
    rig.frames(False, 200)  # no reply yet: nothing to time
    await rig.answered_turn()
    rig.frames(False, 99)  # 1.98 s after the reply
    assert not rig.of("input_audio_buffer.timeout_triggered")
    rig.frames(False, 1)
    (idle,) = rig.of("input_audio_buffer.timeout_triggered")
    assert idle["audio_end_ms"] - idle["audio_start_ms"] == 2000
    asked = await rig.play_until_done()
    assert asked["response"]["output_text"] == "Are you still there?" and len(rig.lm.calls) == 1  # said, not generated
    rig.frames(False, 149)
    assert not closed
    rig.frames(False, 1)  # 3 s after the question
    assert closed == ["idle_timeout"] and len(rig.of("input_audio_buffer.timeout_triggered")) == 2


async def test_a_user_who_answers_the_idle_question_is_asked_again_later_not_hung_up_on(tmp_path):
    rig, closed = _idle_rig(tmp_path, 1000, 1.0)
    await rig.answered_turn()
    rig.frames(False, 50)
    await rig.play_until_done()  # the question
    await rig.answered_turn()  # "yes, I'm here"
    rig.frames(False, 50)
    assert not closed and len(rig.of("input_audio_buffer.timeout_triggered")) == 2
    assert rig.controller.state == State.RESPONDING  # asked again: speaking reset the count


async def test_idle_timeout_off_never_asks(tmp_path):
    rig, closed = _idle_rig(tmp_path, 0, 1.0)
    await rig.answered_turn()
    rig.frames(False, 3000)
    assert not rig.of("input_audio_buffer.timeout_triggered") and not closed
