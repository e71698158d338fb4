"""Server-side echo cancellation: WebRTC's AEC3 (livekit's audio processing module) on a call's own
output, measured on speech played through a synthetic speakerphone room."""

from __future__ import annotations

import numpy as np
import pytest

from realtime.echo import EchoCanceller
from realtime.echo_delay import EchoDelay
from realtime.echo_linear import LinearEcho
from bench.metrics import word_error_rate
from realtime.events import ClientEvent, SessionCreated, SessionUpdate
from realtime.output import PacedOutput
from realtime.session import Session, SessionIO
from runtime.audio import AUDIBLE, FRAME_MS, SAMPLE_RATE, float_to_int16, power
from testkit.peer import ClientPeer
from testkit.room import SpeakerphoneMic, SpeakerRoom
from testkit.speech import espeak
from testkit.ws_peer import WsPeer
from tests.test_controller import make_rig
from vad.engines import SileroDetector

pytestmark = pytest.mark.unit

FRAME = SAMPLE_RATE * FRAME_MS // 1000
REPLY = "The old lighthouse stood at the edge of the cliff, and every night its light swept across the dark water."
USER = "Actually, wait, I have another question."
MORE = "Sailors far out at sea would look for it, and know that they were close to home, and safe from the rocks below."


def _db(pcm: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.asarray(pcm, dtype=np.float64) ** 2) + 1e-12))


def _frames(pcm: np.ndarray) -> list[np.ndarray]:
    return [pcm[i : i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]


def _call(echo: EchoCanceller, reply: np.ndarray, room: SpeakerRoom, user: np.ndarray | None = None, user_at_s: float = 3.0):
    """The reply sent frame by frame through a Session's paced output, the room's echo of it (and
    the user's speech, if any) coming back into the Session's input: (microphone, what the agent
    hears), int16, 16 kHz."""
    output = PacedOutput(48000)
    session = Session("test", output, lambda text: None, echo)
    output.write(reply, SAMPLE_RATE)
    mic_frames, heard = [], []
    rng = np.random.default_rng(1)
    for index in range(len(reply) // FRAME):
        sent = output.next_frame()  # as the pacer sends it: the canceller's reference
        played = sent[::3].astype(np.float32) / 32768  # the client plays it (48 -> 16 kHz is enough here)
        mic = room.echo(played) + rng.normal(0, 3e-4, FRAME).astype(np.float32)
        if user is not None:
            offset = index * FRAME - int(user_at_s * SAMPLE_RATE)
            if 0 <= offset < len(user):
                part = user[offset : offset + FRAME]
                mic[: len(part)] += part
        mic_frames.append(float_to_int16(mic))
        session.push_frame(mic_frames[-1])
        heard.append(session.frames.get_nowait())
    return np.concatenate(mic_frames), np.concatenate(heard)


def test_a_speakerphone_echo_keeps_its_delay_however_the_audio_arrives():
    """The harness's speakerphone plays on its microphone's clock: audio that arrives in bursts
    and late comes back a fixed time after it is played, through a long call (an echo that drifts
    would be the harness's doing, and no canceller follows that)."""
    rate, period_s, seconds = 48000, 0.5, 60
    frame = rate * FRAME_MS // 1000
    received = np.zeros(int(rate * seconds), dtype=np.float32)
    received[:: int(rate * period_s)] = 0.5  # a click every half second
    mic = SpeakerphoneMic(rate, SpeakerRoom(150, 0.0))
    rng = np.random.default_rng(3)
    arrived, heard = 0, []
    for tick in range(len(received) // frame):
        due = min(tick + 1, len(received) // frame)
        # The network hands over none, one, or what is due at once, never more than 60 ms late.
        burst = due - arrived if due - arrived >= 3 else int(rng.integers(0, due - arrived + 1))
        for _ in range(burst):
            mic.play(received[arrived * frame : (arrived + 1) * frame])
            arrived += 1
        heard.append(mic.next_frame())
    echo = np.concatenate(heard).astype(np.float32)
    window = int(rate * period_s)
    where = [int(np.argmax(np.abs(echo[start : start + window]))) for start in range(window, len(echo) - window, window)]
    assert 0.15 * rate < np.median(where) < 0.4 * rate, "the room's 150 ms and the loudspeaker's buffer"
    assert max(where) - min(where) <= 2, f"the echo's delay moved by {(max(where) - min(where)) / rate * 1000:.1f} ms"


@pytest.fixture(scope="module")
def reply() -> np.ndarray:
    return np.concatenate([espeak(REPLY), np.zeros(SAMPLE_RATE, dtype=np.float32)])


@pytest.mark.parametrize(("delay_ms", "loss_db"), [(50, 6), (150, 0), (300, 0)])
def test_the_echo_of_a_reply_is_taken_out_of_the_microphone(reply, delay_ms, loss_db):
    mic, heard = _call(EchoCanceller("on"), reply, SpeakerRoom(delay_ms, loss_db))
    # After the first second (the canceller finds the delay and the room within it): the echo,
    # as loud as the agent's own voice at 0 dB of return loss, comes out at least 18 dB quieter.
    after = slice(SAMPLE_RATE, len(mic) - SAMPLE_RATE)
    assert _db(mic[after]) - _db(heard[after]) >= 18.0, (_db(mic[after]), _db(heard[after]))
    # And in the first second too: its suppressor holds back what the filter has not yet learnt.
    first = slice(0, SAMPLE_RATE)
    assert _db(mic[first]) - _db(heard[first]) >= 15.0


def test_an_echo_later_than_the_canceller_reaches_is_found_and_taken_out(reply):
    """700 ms late (a client's deep buffer, a slow network, a room): AEC3 alone finds no echo over
    ~500 ms late; the reference is held back by the delay found from the two levels."""
    echo = EchoCanceller("on")
    mic, heard = _call(echo, np.concatenate([reply, reply]), SpeakerRoom(700, 0.0))
    assert echo._delay.frames is not None and abs(echo._delay.frames * FRAME_MS - 700) <= 60
    after = slice(5 * SAMPLE_RATE, len(mic) - SAMPLE_RATE)
    assert _db(mic[after]) - _db(heard[after]) >= 18.0, (_db(mic[after]), _db(heard[after]))


def test_an_echo_path_that_moves_is_followed(reply):
    """The client's buffer grows mid-call (300 -> 600 ms): the old delay stops matching, the new
    one is taken once found twice; until then the old one stays."""
    finder = EchoDelay()
    sent = _frames(float_to_int16(np.concatenate([reply] * 4)))
    rng = np.random.default_rng(4)
    for index, frame in enumerate(sent):
        finder.sent(frame)
        lag = 15 if index < len(sent) // 2 else 30
        echo = sent[index - lag] if index >= lag else np.zeros(FRAME, dtype=np.int16)
        finder.heard((echo * 0.5 + rng.normal(0, 10, FRAME)).astype(np.int16))
        if index == len(sent) // 2:
            assert finder.frames == 15
    assert finder.frames == 30


@pytest.mark.parametrize(("delay_ms", "loss_db"), [(50, 0), (300, 6), (700, 0)])
def test_a_call_s_first_echo_delay_is_found_within_a_second_of_it(reply, delay_ms, loss_db):
    """From the waveforms: a user who talks over the first reply 1.5 s in finds the cancellers
    placed (from the levels alone it took 2 s of echo)."""
    finder, room = EchoDelay(), SpeakerRoom(delay_ms, loss_db)
    rng = np.random.default_rng(5)
    request = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)  # the user's request: the agent silent
    for index, sent in enumerate(_frames(float_to_int16(np.concatenate([request, reply])))):
        finder.sent(sent)
        finder.heard(float_to_int16(room.echo(sent.astype(np.float32) / 32768) + rng.normal(0, 3e-4, FRAME).astype(np.float32)))
        if finder.frames is not None:
            break
    first_echo = (len(request) // FRAME + delay_ms // FRAME_MS)
    assert finder.frames is not None and index - first_echo <= 1000 // FRAME_MS, index
    assert abs(finder.frames - delay_ms / FRAME_MS) <= 1


def test_no_delay_is_found_where_nothing_comes_back(reply):
    """Headphones: the microphone hears only its own noise and the user, never the reply."""
    finder = EchoDelay()
    user = espeak(USER, options=["-v", "en-us+f3"])
    rng = np.random.default_rng(2)
    for index, sent in enumerate(_frames(float_to_int16(np.concatenate([reply, reply])))):
        finder.sent(sent)
        heard = rng.normal(0, 3e-4, FRAME).astype(np.float32)
        offset = index * FRAME - 2 * SAMPLE_RATE
        if 0 <= offset < len(user) - FRAME:
            heard += user[offset : offset + FRAME]
        finder.heard(float_to_int16(heard))
    assert finder.frames is None


class Headphones:
    """A room that returns nothing of what is played."""

    def echo(self, played: np.ndarray) -> np.ndarray:
        return np.zeros_like(played)


@pytest.mark.parametrize("at_s", [2.5, 4.0, 6.0])
def test_over_headphones_the_user_talking_over_the_agent_is_heard_whole(long_reply, at_s):
    """Nothing comes back, so nothing is taken out: from 2.2 s into the reply the user's words
    reach the VAD at their own level, quiet or loud. AEC3 alone mutes them by up to 40 dB, and a
    delay that their voice seemed to match made the guard start over and mute them too (live,
    a browser with its canceller off, one CI run in a few)."""
    user = espeak(USER, options=["-v", "en-us+f3"])
    during = slice(int(at_s * SAMPLE_RATE), int(at_s * SAMPLE_RATE) + len(user))
    for gain in (1.0, 0.1):
        heard = _call(EchoCanceller("on"), long_reply, Headphones(), user * gain, user_at_s=at_s)[1]
        assert abs(_db(heard[during]) - _db(float_to_int16(user * gain))) <= 1.0, (gain, _db(heard[during]))


def test_the_user_talking_over_the_echo_is_kept(reply):
    user = espeak(USER, options=["-v", "en-us+f3"])
    during = slice(3 * SAMPLE_RATE, 3 * SAMPLE_RATE + len(user))
    mic, heard = _call(EchoCanceller("on"), reply, SpeakerRoom(150, 0), user)
    echo_only = _call(EchoCanceller("on"), reply, SpeakerRoom(150, 0))[1]
    # Double-talk: the user's words come through within 8 dB of their level, well above the echo left.
    assert abs(_db(heard[during]) - _db(float_to_int16(user))) <= 8.0, (_db(heard[during]), _db(float_to_int16(user)))
    assert _db(heard[during]) - _db(echo_only[during]) >= 12.0


@pytest.fixture(scope="module")
def long_reply(reply) -> np.ndarray:
    """Eleven seconds of the agent's voice: long enough for the linear canceller to have converged."""
    return np.concatenate([reply[:-SAMPLE_RATE], espeak(MORE), np.zeros(SAMPLE_RATE, dtype=np.float32)])


def test_the_user_talking_over_the_agent_at_its_echo_s_level_is_heard_whole(long_reply, embedded_models):
    """Double-talk once the linear canceller has learnt the room: the user's request, as loud as
    the echo (0 dB of return loss), comes through at its own level and the ASR hears it as said;
    AEC3 alone mutes and garbles it (measured: "And she went on another list...")."""
    user = espeak(USER, options=["-v", "en-us+f3"])
    at_s = 6.0
    during = slice(int(at_s * SAMPLE_RATE), int(at_s * SAMPLE_RATE) + len(user))
    echo = EchoCanceller("on")
    mic, heard = _call(echo, long_reply, SpeakerRoom(150, 0), user, user_at_s=at_s)
    assert echo._linear.converged
    assert abs(_db(heard[during]) - _db(float_to_int16(user))) <= 3.0, (_db(heard[during]), _db(float_to_int16(user)))
    transcript = embedded_models.asr.transcribe_now(heard[during.start - SAMPLE_RATE // 10 : during.stop])
    assert word_error_rate(USER, transcript) <= 0.2, transcript  # a word of six, at most
    # And the echo alone, over the same seconds, is silenced.
    echo_only = _call(EchoCanceller("on"), long_reply, SpeakerRoom(150, 0))[1]
    assert _db(heard[during]) - _db(echo_only[during]) >= 30.0


@pytest.mark.parametrize("delay_ms, loss_db", [(150, 0.0), (300, 6.0)])
def test_the_user_barging_in_on_a_call_s_first_reply_is_heard_from_their_first_word(long_reply, delay_ms, loss_db):
    """The call's first reply, after the user's request (2 s the agent sent nothing): they stop
    it 1.2 s into its echo, as loud as the echo. The delay is found half a second into the echo
    and the filter has taken out only 6-11 dB by then; their first word must come through all the
    same, and the echo alone stay silenced. (Trusted from 13 dB, the filter was not yet: AEC3's
    suppressor muted "Wait" (-64 dB) and more (-6.7 dB over the whole), and live the ASR heard a
    fragment ("So,") that resumed the reply. With the echo's level at the microphone learnt only
    after 1.2 s of it, an echo 6 dB under what was sent was taken as loud as sent, and a user at
    its level lost their first 300 ms all the same.)"""
    call = np.concatenate([np.zeros(2 * SAMPLE_RATE, dtype=np.float32), long_reply])
    user = espeak("Wait, stop please.", options=["-v", "en-us+f3"]) * 10 ** (-loss_db / 20)
    at_s = 2.0 + delay_ms / 1000 + 1.2
    start = int(at_s * SAMPLE_RATE)
    during = slice(start, start + len(user))
    lead = int(np.flatnonzero(np.abs(user) > 0.005)[0])  # their first sound
    first = slice(start + lead, start + lead + int(0.3 * SAMPLE_RATE))
    heard = _call(EchoCanceller("on"), call, SpeakerRoom(delay_ms, loss_db), user, user_at_s=at_s)[1]
    said = float_to_int16(user)
    assert abs(_db(heard[first]) - _db(said[lead : lead + int(0.3 * SAMPLE_RATE)])) <= 3.0, _db(heard[first])
    assert abs(_db(heard[during]) - _db(said)) <= 3.0, _db(heard[during])
    echo_only = _call(EchoCanceller("on"), call, SpeakerRoom(delay_ms, loss_db))[1]
    assert _db(heard[during]) - _db(echo_only[during]) >= 20.0


@pytest.mark.parametrize("delay_ms, loss_db", [(150, 0.0), (300, 6.0)])
def test_the_reply_to_a_barge_in_does_not_take_its_own_first_echo_for_speech(delay_ms, loss_db):
    """The call's first reply, stopped by the user 1.2 s into its echo (as loud as the echo), and
    2.5 s later the reply to them. The filter has learnt little more than a second of echo and
    takes some of the new reply's syllables out less well than the rest: none of its first 1.5 s
    of echo may reach the VAD as speech (two frames over 0.5 pause a reply), and the user's
    barge-in still does within 100 ms. (Held only to the threshold itself, what was left of
    "Sure, here is" came back 0.5-1.5 dB over it: speech 0.12-0.36 s into the reply, in each of
    six rooms and voices tried.)"""
    first = espeak(REPLY)[: int(2.6 * SAMPLE_RATE)]
    second = espeak("Sure, here is a different story about a small village by the sea.")
    silence = np.zeros(int(2.5 * SAMPLE_RATE), dtype=np.float32)
    call = np.concatenate([np.zeros(2 * SAMPLE_RATE, dtype=np.float32), first, silence, second])
    user = espeak("Wait, stop please, tell me about something else.", options=["-v", "en-us+f3"]) * 10 ** (-loss_db / 20)
    at_s = 2.0 + delay_ms / 1000 + 1.2
    heard = _call(EchoCanceller("on"), call, SpeakerRoom(delay_ms, loss_db), user, user_at_s=at_s)[1]
    vad = SileroDetector()
    speech = [vad.probability(frame) > 0.5 for frame in _frames(heard)]
    barge_in = int(at_s * SAMPLE_RATE) // FRAME
    assert any(speech[barge_in : barge_in + 100 // FRAME_MS])
    reply = (2 * SAMPLE_RATE + len(first) + len(silence)) // FRAME
    echo = speech[reply : reply + (delay_ms + 1500) // FRAME_MS]
    onsets = [index * FRAME_MS for index in range(1, len(echo)) if echo[index - 1] and echo[index]]
    assert not onsets, f"the reply's own echo heard as speech {onsets[0]} ms into it"


def test_a_user_talking_over_the_echo_does_not_teach_the_linear_canceller_their_voice(long_reply):
    """Placed 1 s into the echo, the filter hears the user talk over it 6 dB louder from 1.5 s
    for 2 s, before it has learnt much: the echo after them is taken out as well as without them
    (with one filter that learnt from every frame in its first 2 s, it was not)."""
    user = 2 * espeak(USER, options=["-v", "en-us+f3"])
    user_at, aligned_at = int(1.5 * SAMPLE_RATE) // FRAME, SAMPLE_RATE // FRAME

    def left_db(with_user: bool) -> float:
        linear, room, rng = LinearEcho(), SpeakerRoom(150, 0), np.random.default_rng(6)
        mic, residual = [], []
        for index, sent in enumerate(_frames(float_to_int16(long_reply))):
            linear.sent(sent.astype(np.float32))
            heard = room.echo(sent.astype(np.float32) / 32768) + rng.normal(0, 3e-4, FRAME).astype(np.float32)
            offset = (index - user_at) * FRAME
            if with_user and 0 <= offset < len(user) - FRAME:
                heard += user[offset : offset + FRAME]
            if index == aligned_at:
                linear.align(150 // FRAME_MS)
            mic.append(float_to_int16(heard))
            residual.append(linear.cancel(mic[-1]))
        after = slice((user_at + len(user) // FRAME) * FRAME, (user_at + len(user) // FRAME + 50) * FRAME)
        return _db(np.concatenate(residual)[after]) - _db(np.concatenate(mic)[after])

    alone, after_user = left_db(False), left_db(True)
    assert alone <= -15.0, alone
    assert after_user <= alone + 3.0, (after_user, alone)


@pytest.mark.parametrize("louder", [2.0, 4.0])
def test_the_user_answering_over_a_reply_s_last_echo_does_not_spoil_the_next_reply(long_reply, reply, louder):
    """The user answers as the reply's echo fades (80 ms after its last audible frame comes back,
    6 or 12 dB over the echo): the filter learns from their voice there, and the next reply's echo
    must come out as well as ever. (Live, over /ws: the learning filter kept what it learnt from
    the user, won the comparison on the next reply's first frames, and left more than the
    microphone heard: the agent took its own echo for the user's next words.)"""
    user = louder * espeak("Tell me about the history of tea.", options=["-v", "en-us+f3"])
    delay = 150 // FRAME_MS
    sent_frames = _frames(float_to_int16(np.concatenate([long_reply, np.zeros(2 * SAMPLE_RATE, np.float32), reply])))
    last_audible = max(i for i, frame in enumerate(sent_frames[: len(long_reply) // FRAME]) if power(frame) > AUDIBLE)
    user_at, next_at = last_audible + delay + 80 // FRAME_MS, (len(long_reply) + 2 * SAMPLE_RATE) // FRAME
    linear, room, rng = LinearEcho(), SpeakerRoom(150, 0), np.random.default_rng(6)
    mic, residual = [], []
    for index, sent in enumerate(sent_frames):
        linear.sent(sent.astype(np.float32))
        heard = room.echo(sent.astype(np.float32) / 32768) + rng.normal(0, 3e-4, FRAME).astype(np.float32)
        offset = (index - user_at) * FRAME
        if 0 <= offset < len(user) - FRAME:
            heard += user[offset : offset + FRAME]
        if index == SAMPLE_RATE // FRAME:
            linear.align(delay)
        mic.append(float_to_int16(heard))
        residual.append(linear.cancel(mic[-1]))
    echo = range(next_at + delay, next_at + delay + 50)  # the next reply's first second of echo
    worst = max(_db(residual[i]) - _db(mic[i]) for i in echo if _db(mic[i]) > 40)
    assert worst <= -3.0, f"a frame of the echo came out {worst:+.1f} dB against the microphone"
    whole = _db(np.concatenate([residual[i] for i in echo])) - _db(np.concatenate([mic[i] for i in echo]))
    assert whole <= -15.0, whole


def test_off_the_input_passes_untouched_and_the_module_is_never_made(reply):
    echo = EchoCanceller("off")
    mic, heard = _call(echo, reply, SpeakerRoom(150, 0))
    assert np.array_equal(mic, heard)
    assert echo._apm is None


@pytest.mark.parametrize(
    ("mode", "client_cancels", "enabled"),
    [("auto", None, False), ("auto", True, False), ("auto", False, True), ("on", True, True), ("off", None, False), ("off", False, False)],
)
def test_who_cancels(mode, client_cancels, enabled):
    assert EchoCanceller(mode, client_cancels).enabled is enabled


async def test_the_client_says_mid_call_whether_it_cancels_echo_itself(tmp_path):
    """The page's switch: `session.update` with `client_echo_cancellation`, answered in
    `session.updated`; anything but a boolean is refused and changes nothing."""
    rig = make_rig(tmp_path)
    rig.controller.io.echo = EchoCanceller("auto")
    assert not rig.controller.io.echo.enabled  # the client said nothing
    rig.controller.on_client_event(SessionUpdate({"client_echo_cancellation": True}))
    assert rig.of("session.updated")[-1]["session"]["echo_cancellation"] is False
    assert not rig.controller.io.echo.enabled
    rig.controller.on_client_event(SessionUpdate({"client_echo_cancellation": "yes"}, event_id="e2"))
    assert rig.of("error")[-1]["error"]["code"] == "invalid_value" and len(rig.of("session.updated")) == 1
    rig.controller.on_client_event(SessionUpdate({"client_echo_cancellation": False, "turn_detection": {"commit_ms": 900}}))
    updated = rig.of("session.updated")[-1]["session"]
    assert updated["echo_cancellation"] is True and updated["turn_detection"]["commit_ms"] == 900


class Speaker:
    """An agent that says one thing as the call starts and keeps what it hears."""

    def __init__(self, io: SessionIO, reply: np.ndarray) -> None:
        self.io, self.reply = io, reply
        self.heard: list[np.ndarray] = []

    async def run(self) -> None:
        self.io.emit(SessionCreated({"id": self.io.session_id, "echo_cancellation": self.io.echo.enabled}))
        self.io.output.write(self.reply, SAMPLE_RATE)
        while True:
            self.heard.append(await self.io.frames.get())

    def on_client_event(self, event: ClientEvent) -> None:
        pass


@pytest.mark.parametrize("transport", ["ws", "webrtc"])
async def test_a_call_on_a_speakerphone_hears_the_echo_cancelled(start_server, reply, transport):
    """The same reply played into a speakerphone (150 ms, 0 dB) over a real call, with and without
    the canceller: what the agent hears of it, the whole reply through."""
    heard_db = {}
    for mode in ("off", "on"):
        agents: list[Speaker] = []
        server = await start_server(factory=lambda io: agents.append(Speaker(io, reply)) or agents[-1], echo_cancel=mode)
        room = SpeakerRoom(150, 0.0)
        peer = WsPeer(server.url, room=room) if transport == "ws" else ClientPeer(server.url, room=room, events=False)
        await peer.connect()
        frames = len(reply) // FRAME + 25  # the reply and its echo's way back
        await peer.changed.wait_for(lambda: len(agents) == 1 and len(agents[0].heard) >= frames, timeout=30)
        heard_db[mode] = _db(np.concatenate(agents[0].heard[:frames]))
        await peer.close()
    assert heard_db["off"] - heard_db["on"] >= 15.0, heard_db
