"""Step-Audio 2 mini on tiny random weights in the published layout (`testkit/stepaudio2_tiny.py`):
the prompt as the reference builds it, the log-mel, and the model's audio path. Parity with
StepFun's own code on the same weights is `python -m bench.stepaudio2_parity` (README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.stepaudio2_input import (
    AUDIO_START_ID,
    Audio,
    Tokens,
    Turn,
    chat_pieces,
    log_mel,
    patch_count,
    piece_ids,
    split_reply,
)
from testkit.stepaudio_tiny import tone_speech

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from testkit.stepaudio2_tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("step-audio-2-mini"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from models.stepaudio2_lm import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    from models.stepaudio2_lm import StepAudio2Model

    return StepAudio2Model.load(model_dir)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    return tone_speech(seconds, 16000, seed).astype(np.float32)


def test_turns_are_laid_out_as_the_reference_lays_them_out():
    pieces, mels = chat_pieces([
        Turn("system", "Be brief."),
        Turn("user", ("Translate this.", Audio(speech(1.0)))),
        Turn("assistant", ("<tts_start>", Tokens((151700, 32)))),
        Turn("user", "And this?"),
        Turn("assistant", "<tts_start>", eot=False),
    ])
    frames = (16000 + 479) // 160  # the centred STFT's frames, the last dropped
    assert [m.shape for m in mels] == [(128, frames)]
    assert pieces == [
        "<|BOT|>system\nBe brief.<|EOT|>",
        "<|BOT|>human\n", "Translate this.", "<audio_start>" + "<audio_patch>" * patch_count(frames) + "<audio_end>", "<|EOT|>",
        "<|BOT|>assistant\n", "<tts_start>", [151700, 32], "<|EOT|>",
        "<|BOT|>human\nAnd this?<|EOT|>",
        "<|BOT|>assistant\n<tts_start>",
    ]
    assert chat_pieces([Turn("assistant", None)])[0] == ["<|BOT|>assistant\n"]


def test_speech_is_cut_into_windows_of_25_seconds():
    _, mels = chat_pieces([Turn("user", (Audio(speech(56.0)),))])
    assert [m.shape[1] for m in mels] == [(25 * 16000 + 479) // 160] * 2 + [(6 * 16000 + 479) // 160]


def test_each_piece_is_tokenized_on_its_own_and_the_specials_are_one_id_each(tokenizer):
    ids = piece_ids(tokenizer, ["<|BOT|>human\n", "hi", [151700], "<audio_start><audio_patch><audio_patch><audio_end>"])
    bot, start, patch, end = tokenizer.convert_tokens_to_ids(["<|BOT|>", "<audio_start>", "<audio_patch>", "<audio_end>"])
    assert start == AUDIO_START_ID
    assert ids == [bot, *tokenizer("human\n")["input_ids"], *tokenizer("hi")["input_ids"], 151700, start, patch, patch, end]
    assert split_reply([104, 151693, 151696 + 5, 105, 151696]) == ([104, 105], [5, 0])


def test_the_log_mel_is_whispers_with_the_references_padding():
    """Stated from its definition: 479 zeros appended; frames every 160 samples of a 400-point
    periodic Hann window, centred (reflected 200 samples at the ends), the last frame dropped;
    librosa's Slaney mel filters on the power; log10 floored at 1e-10 and 8 below the peak."""
    import librosa

    audio = speech(1.5)
    padded = np.pad(np.pad(audio, (0, 479)).astype(np.float64), 200, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    starts = range(0, len(padded) - 400 + 1, 160)
    power = np.abs(np.fft.rfft(np.stack([padded[s : s + 400] * window for s in starts]), axis=1)) ** 2
    spec = np.log10(np.maximum(librosa.filters.mel(sr=16000, n_fft=400, n_mels=128) @ power[:-1].T, 1e-10))
    expected = (np.maximum(spec, spec.max() - 8.0) + 4.0) / 4.0
    assert np.abs(log_mel(audio).numpy() - expected).max() < 1e-4


@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.97, 25.0])
def test_the_placeholders_are_as_many_as_the_features_the_model_makes(model, seconds):
    mel = log_mel(speech(seconds))
    [features] = model.audio_features([mel])
    assert features.shape == (patch_count(mel.shape[1]), model.text_config.hidden_size)


def test_windows_of_different_lengths_batch_as_each_alone(model):
    """The encoder masks the padding of a shorter window: batched with a longer one, its features
    are the ones it has alone."""
    import torch

    short, long = log_mel(speech(1.7, 1)), log_mel(speech(4.0, 2))
    together = model.audio_features([long, short])
    torch.testing.assert_close(together[1], model.audio_features([short])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[0], model.audio_features([long])[0], atol=1e-5, rtol=1e-5)


def test_the_audio_reaches_the_decoder_after_its_audio_start(model, tokenizer):
    """The published weights' names load strictly; the speech's features replace the placeholders:
    positions before them do not change with the speech, positions after do."""
    import torch

    def run(seed: int):
        pieces, mels = chat_pieces([Turn("user", ("Hi", Audio(speech(2.0, seed)))), Turn("assistant", None)])
        ids = piece_ids(tokenizer, pieces)
        return ids, model.logits(ids, mels)

    ids, first = run(1)
    _, second = run(2)
    start = ids.index(AUDIO_START_ID)
    assert first.shape == (len(ids), model.text_config.vocab_size) and torch.isfinite(first).all()
    torch.testing.assert_close(first[: start + 1], second[: start + 1])
    assert (first[start + 1 :] - second[start + 1 :]).abs().max() > 1e-3


def _greedy_by_recomputing(model, ids, mels, steps):
    """The greedy reply with no cache: the whole sequence through the model at every step."""
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(model.logits(ids, mels)[-1].argmax()))
    return ids[-steps:]


def test_a_reply_generated_with_the_cache_is_the_one_recomputed_each_step(model, tokenizer):
    from models.stepaudio2_lm import Sampling

    pieces, mels = chat_pieces([Turn("user", (Audio(speech(2.0)),)), Turn("assistant", "<tts_start>", eot=False)])
    ids = piece_ids(tokenizer, pieces)
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0)
    reply = list(model.generate(ids, mels, greedy, 12, frozenset()))
    assert reply == _greedy_by_recomputing(model, ids, mels, 12)


def test_the_next_turn_reuses_the_cached_history_and_answers_the_same(model_dir, tokenizer):
    """The second turn's prompt begins with the first turn's prompt and reply: only the rest is
    prefilled, and the reply is what a model with no cache gives. A turn with other speech of the
    same length shares nothing past its audio."""
    from models.stepaudio2_lm import Sampling, StepAudio2Model

    model = StepAudio2Model.load(model_dir)
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0)
    first = [Turn("system", "Be brief."), Turn("user", (Audio(speech(2.0, 1)),))]
    pieces, mels = chat_pieces([*first, Turn("assistant", None)])
    ids = piece_ids(tokenizer, pieces)
    reply = list(model.generate(ids, mels, greedy, 6, frozenset()))
    second = [*first, Turn("assistant", (Tokens(tuple(reply)),)), Turn("user", (Audio(speech(1.0, 2)),)), Turn("assistant", None)]
    pieces, mels = chat_pieces(second)
    ids2 = piece_ids(tokenizer, pieces)
    assert ids2[: len(ids) - 1] == ids[:-1]  # "<|BOT|>assistant\n" opens both at the same place
    answer = list(model.generate(ids2, mels, greedy, 6, frozenset()))
    assert model.reused_tokens >= len(ids) - 2
    fresh = StepAudio2Model.load(model_dir)
    assert answer == list(fresh.generate(ids2, mels, greedy, 6, frozenset())) and fresh.reused_tokens == 0

    other = chat_pieces([first[0], Turn("user", (Audio(speech(2.0, 3)),)), Turn("assistant", None)])
    before = model.reused_tokens
    list(model.generate(piece_ids(tokenizer, other[0]), other[1], greedy, 2, frozenset()))
    assert model.reused_tokens - before == ids.index(AUDIO_START_ID) + 1


def test_sampling_penalises_what_was_said_and_keeps_to_the_nucleus():
    import torch

    from models.stepaudio2_lm import Sampling

    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    seen = torch.tensor([True, False, False, False])
    assert Sampling(temperature=0.0, repetition_penalty=1.0).pick(logits, seen) == 0
    assert Sampling(temperature=0.0, repetition_penalty=1.1).pick(logits, seen) == 1  # 2.0 / 1.1 < 1.9
    narrow = Sampling(temperature=1.0, top_p=0.01, repetition_penalty=1.0)
    assert {narrow.pick(logits, seen, torch.Generator().manual_seed(i)) for i in range(20)} == {0}
    wide = Sampling(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    assert len({wide.pick(logits, seen, torch.Generator().manual_seed(i)) for i in range(60)}) >= 3


# -- token2wav ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token2wav(tmp_path_factory):
    from models.stepaudio2_token2wav import Token2Wav
    from testkit.stepaudio2_tiny import build_token2wav_dir

    return Token2Wav(build_token2wav_dir(tmp_path_factory.mktemp("token2wav")))


@pytest.fixture(scope="module")
def voice(token2wav):
    return token2wav.voice(tone_speech(2.0, 22050, 5).astype(np.float32), 22050)


def speech_tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 6561, n)]


def test_a_voice_prompt_gives_its_tokens_xvector_and_mel(voice):
    assert voice.tokens.shape == (1, 50)  # 25 a second
    assert voice.embedding.shape == (1, 192)
    assert voice.mel.shape == (1, 100, 80)  # 50 frames a second at 24 kHz


def test_tokens_become_24_khz_audio_in_one_pass(token2wav, voice):
    audio = token2wav.decode(speech_tokens(40), voice)
    assert audio.shape == (40 * 960,) and np.isfinite(audio).all() and np.abs(audio).max() > 1e-4


def test_streamed_audio_starts_with_the_first_chunk_and_follows_the_one_pass_until_the_cache_is_cut(token2wav, voice):
    """A chunk is decoded once its 25 tokens and 3 of look-ahead are in, and its audio is out less
    the overlap the next chunk cross-fades. The streamed mel follows the one pass's (each chunk
    attends causally, the one pass to every frame) while the flow's attention cache holds every
    frame; once it passes the prompt and 100 frames it is cut to those, and each later chunk
    attends to the prompt and the last 2 s."""
    import torch

    tokens = speech_tokens(90, 1)
    stream = token2wav.stream(voice)
    assert stream.push(tokens[:27]).size == 0
    first = stream.push(tokens[27:28])
    assert first.size == 25 * 960 - 3840
    audio = np.concatenate([first, stream.push(tokens[28:]), stream.finish()])
    assert audio.shape == (90 * 960,) and np.isfinite(audio).all()
    streamed, whole = torch.cat(stream.mel_frames, dim=2)[0], token2wav.flow_mel(tokens, voice)[0]
    assert streamed.shape == whole.shape
    uncut = 3 * 50  # three chunks of 50 frames: the cache passes 100 after the third
    assert float((streamed[:, :uncut] - whole[:, :uncut]).norm() / whole[:, :uncut].norm()) < 0.05
    assert torch.isfinite(streamed[:, uncut:]).all()


def test_a_long_streamed_reply_keeps_the_flow_cache_bounded(token2wav, voice):
    stream = token2wav.stream(voice)
    for start in range(0, 400, 25):
        stream.push(speech_tokens(25, start))
    attended = stream._flow_cache["estimator_att_cache"].shape[4]
    assert attended <= voice.tokens.shape[1] * 2 + 100 + 2 * 28


def test_a_prompt_prefilled_while_the_user_speaks_is_not_run_again(model_dir, tokenizer):
    """The history and the first 25 s window of a long utterance, prefilled while the user still
    speaks: at the pause only the last window and the turn's end go through the model, and the
    reply is what a model with no cache gives."""
    from models.stepaudio2_lm import Sampling, StepAudio2Model

    greedy = Sampling(temperature=0.0, repetition_penalty=1.0)
    words = speech(31.0, 4)
    history = [Turn("system", "Be brief."), Turn("user", "Hi."), Turn("assistant", "Hello.")]
    so_far = chat_pieces([*history, Turn("user", (Audio(words[: 25 * 16000]),), eot=False)])
    whole = chat_pieces([*history, Turn("user", (Audio(words),)), Turn("assistant", None)])
    ids = piece_ids(tokenizer, whole[0])
    model = StepAudio2Model.load(model_dir)
    model.prefill(piece_ids(tokenizer, so_far[0]), so_far[1])
    before = model.reused_tokens
    answer = list(model.generate(ids, whole[1], greedy, 4, frozenset()))
    assert model.reused_tokens - before >= len(piece_ids(tokenizer, so_far[0])) - 1
    assert answer == list(StepAudio2Model.load(model_dir).generate(ids, whole[1], greedy, 4, frozenset()))


def test_a_whole_window_encoded_while_the_user_speaks_is_not_encoded_again(model_dir, tokenizer):
    """The first 25 s window of a long utterance encoded while the user still speaks: the prompt at
    the pause runs only the last window through the encoder, and its logits and reply are those of
    a model that encoded both then."""
    import torch

    from models.stepaudio2_lm import Sampling, StepAudio2Model

    greedy = Sampling(temperature=0.0, repetition_penalty=1.0)
    words = speech(31.0, 5)
    pieces, mels = chat_pieces([Turn("system", "Be brief."), Turn("user", (Audio(words),)), Turn("assistant", None)])
    ids = piece_ids(tokenizer, pieces)
    model, fresh = StepAudio2Model.load(model_dir), StepAudio2Model.load(model_dir)
    model.encode_ahead(log_mel(words[: 25 * 16000]))
    assert model.windows_encoded == 1
    answer = list(model.generate(ids, mels, greedy, 4, frozenset()))
    assert model.windows_encoded == 2  # the last 6 s only
    assert answer == list(fresh.generate(ids, mels, greedy, 4, frozenset())) and fresh.windows_encoded == 2
    torch.testing.assert_close(model.logits(ids, mels), fresh.logits(ids, mels), atol=1e-5, rtol=1e-5)


def test_the_smoke_timing_runs_and_reports_every_stage(capsys):
    """`python -m bench.stepaudio2_smoke` (for a GPU when one is lent), here on the CPU."""
    import json

    from bench.stepaudio2_smoke import main

    assert main(["--device", "cpu", "--max-new-tokens", "4", "--speech-tokens", "60"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lm"]["tokens"] >= 1 and report["lm"]["first_token_ms"] > 0
    assert report["token2wav"]["audio_s"] == 2.4 and report["token2wav"]["rtf"] > 0
