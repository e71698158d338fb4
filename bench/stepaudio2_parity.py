"""Parity of our Step-Audio 2 code with StepFun's reference, on tiny random weights (never needed by CI):

    python -m bench.stepaudio2_parity --reference STEP_AUDIO2_CHECKOUT --model-code MODEL_CODE_DIR

`--reference`: a checkout of github.com/stepfun-ai/Step-Audio2 (its `stepaudio2.py`, `utils.py`,
`device_utils.py`); `--model-code`: the folder holding the model repository's
`modeling_step_audio_2.py` and `configuration_step_audio_2.py`. The reference reads audio with
torchaudio: with none installed, a stand-in reading 16 kHz wavs takes its place (the cases' audio
is 16 kHz, so nothing is resampled). For each case (text, speech, speech over 25 s, a multi-turn
conversation with an earlier spoken reply's tokens, text and speech in one turn) it builds the
prompt both ways and compares the ids, each audio window's log-mel, the fp32 logits at every
position, and an 8-token greedy reply (ours generated with its attention cache, the reference's
with the whole sequence through its model each step); and the reference's `token2wav.py` one pass
beside ours on one tiny `token2wav/` directory (it needs torchaudio's Python parts: with torch
2.13, an unpacked torchaudio wheel on PYTHONPATH, its compiled extension removed). Prints one
JSON object; exits 1 when an id or a reply token differs, a logit is off by more than 1e-4, or
the audio by more than 1e-4 of its peak.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

LOGIT_TOLERANCE = 1e-4
GREEDY_STEPS = 8
TOKEN2WAV_TOLERANCE = 1e-4  # of the audio's peak: the x-vector's fbank is Kaldi's by another library


def _audio(seconds: float, seed: int) -> np.ndarray:
    from testkit.stepaudio_tiny import tone_speech

    return tone_speech(seconds, 16000, seed).astype(np.float32)


def cases(wavs: Path) -> dict[str, list[dict[str, Any]]]:
    """Each case's messages in the reference's form (audio as 16 kHz wav paths)."""
    import soundfile

    def wav(name: str, seconds: float, seed: int) -> str:
        path = wavs / f"{name}.wav"
        soundfile.write(path, _audio(seconds, seed), 16000, subtype="FLOAT")
        return str(path)

    system = {"role": "system", "content": "You are a helpful assistant."}
    question = wav("question", 3.0, 1)
    return {
        "text": [system, {"role": "human", "content": "Give me a brief introduction to the Great Wall."}, {"role": "assistant", "content": None}],
        "speech": [system, {"role": "human", "content": [{"type": "audio", "audio": question}]}, {"role": "assistant", "content": "<tts_start>", "eot": False}],
        "speech over 25 s": [system, {"role": "human", "content": [{"type": "audio", "audio": wav("long", 31.0, 2)}]}, {"role": "assistant", "content": None}],
        "multi-turn": [
            system,
            {"role": "human", "content": [{"type": "audio", "audio": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": [151700, 32, 151696, 9, 151699]}]},
            {"role": "human", "content": "Now write a 4-line poem about it."},
            {"role": "assistant", "content": None},
        ],
        "text and speech": [
            system,
            {"role": "human", "content": [{"type": "text", "text": "Translate the speech into Chinese."}, {"type": "audio", "audio": wav("short", 1.3, 3)}]},
            {"role": "assistant", "content": None},
        ],
    }


def ours(messages: list[dict[str, Any]]) -> list[Any]:
    """The same messages as our typed turns."""
    import soundfile

    from models.stepaudio2_input import Audio, Tokens, Turn

    def part(item: dict[str, Any]) -> Any:
        if item["type"] == "audio":
            return Audio(soundfile.read(item["audio"], dtype="float32")[0])
        return item["text"] if item["type"] == "text" else Tokens(tuple(item["token"]))

    turns = []
    for m in messages:
        content = m["content"] if m["content"] is None or isinstance(m["content"], str) else tuple(part(i) for i in m["content"])
        turns.append(Turn(m["role"], content, m.get("eot", True)))
    return turns


def _reference(reference: Path, model_dir: Path) -> Any:
    """The reference's StepAudio2 on `model_dir`, in fp32 on the CPU."""
    import soundfile
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("torchaudio") is None:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    sys.path.insert(0, str(reference))
    utils = importlib.import_module("utils")
    # Under its own name: `stepaudio2` is also minicpmo-utils' package, which token2wav imports.
    spec = importlib.util.spec_from_file_location("reference_stepaudio2", reference / "stepaudio2.py")
    stepaudio2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stepaudio2)
    read = lambda path, **_: torch.from_numpy(soundfile.read(path, dtype="float32")[0])  # noqa: E731
    utils.load_audio = stepaudio2.load_audio = read
    model = stepaudio2.StepAudio2.__new__(stepaudio2.StepAudio2)
    model.llm_tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True, padding_side="right")
    model.llm = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    model.padding_mels = utils.padding_mels
    return model


def _reference_logits(model: Any, ids: list[int], mels: list[Any]) -> Any:
    import torch

    inputs = torch.tensor([ids])
    wavs, lengths = model.padding_mels(mels) if mels else (None, None)
    with torch.inference_mode():
        return model.llm(input_ids=inputs, wavs=wavs, wav_lens=lengths, attention_mask=torch.ones_like(inputs)).logits[0]


def _reference_run(model: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[Any], Any, list[int]]:
    """The prompt ids, mels and logits as the reference's `__call__` prepares and its model
    computes them, and its greedy reply (the whole sequence through the model at each step)."""
    pieces, mels = model.apply_chat_template(messages)
    ids: list[int] = []
    for piece in pieces:
        ids += model.llm_tokenizer(text=piece, return_tensors="pt", padding=True)["input_ids"][0].tolist() if isinstance(piece, str) else list(piece)
    logits = _reference_logits(model, ids, mels)
    reply = [int(logits[-1].argmax())]
    while len(reply) < GREEDY_STEPS:
        reply.append(int(_reference_logits(model, ids + reply, mels)[-1].argmax()))
    return ids, mels, logits, reply


def compare(reference: Path, model_code: Path) -> dict[str, Any]:
    import torch

    from models.stepaudio2_input import chat_pieces, piece_ids
    from models.stepaudio2_lm import Sampling, StepAudio2Model, load_tokenizer
    from testkit.stepaudio2_tiny import build_model_dir

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "Step-Audio-2-mini")
        for name in ("modeling_step_audio_2.py", "configuration_step_audio_2.py"):
            shutil.copy(model_code / name, model_dir / name)
        ref = _reference(reference, model_dir)
        model, tokenizer = StepAudio2Model.load(model_dir), load_tokenizer(model_dir)
        results = {}
        for name, messages in cases(Path(scratch)).items():
            ref_ids, ref_mels, ref_logits, ref_reply = _reference_run(ref, messages)
            pieces, mels = chat_pieces(ours(messages))
            ids = piece_ids(tokenizer, pieces)
            logits = model.logits(ids, mels)
            greedy = Sampling(temperature=0.0, repetition_penalty=1.0)
            reply = list(model.generate(ids, mels, greedy, GREEDY_STEPS, frozenset()))
            results[name] = {
                "ids": len(ids),
                "ids_equal": ids == ref_ids,
                "windows": len(mels),
                "mel_max_diff": max((float((a - b).abs().max()) for a, b in zip(mels, ref_mels, strict=True)), default=0.0),
                "logits_max_diff": float((logits - ref_logits).abs().max()) if ids == ref_ids else None,
                "logits_scale": float(ref_logits.abs().max()),
                "greedy_reply_equal": reply == ref_reply,  # ours with its attention cache
            }
    return {"torch": torch.__version__, "cases": results}


class _OnnxSpeechTokenizer:
    """s3tokenizer's model for the reference, on the tiny tokenizer ONNX: s3tokenizer converts the
    published ONNX into its own torch model by the published graph's names, which a tiny model
    does not have; here the same file runs in onnxruntime, as our side runs it."""

    def __init__(self, path: str) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def to(self, device: Any) -> _OnnxSpeechTokenizer:
        return self

    def eval(self) -> _OnnxSpeechTokenizer:
        return self

    def quantize(self, mels: Any, lengths: Any) -> tuple[Any, Any]:
        import torch

        inputs = self.session.get_inputs()
        tokens = self.session.run(None, {inputs[0].name: mels.numpy(), inputs[1].name: lengths.numpy().astype(np.int32)})[0]
        return torch.from_numpy(np.asarray(tokens, dtype=np.int32)), torch.tensor([tokens.shape[1]])


def compare_token2wav(reference: Path) -> dict[str, Any]:
    """The reference's `token2wav.py` (one pass) and ours on the same tiny token2wav directory, the
    same 22,050 Hz voice prompt and tokens: the 24 kHz audio of each. Needs torchaudio's Python
    parts (its kaldi fbank and Resample); its file I/O is done with soundfile."""
    import io

    import soundfile
    import torch
    import torchaudio

    import s3tokenizer
    from models.stepaudio2_token2wav import Token2Wav
    from testkit.stepaudio2_tiny import build_token2wav_dir
    from testkit.stepaudio_tiny import tone_speech

    def load(path: Any, **_: Any) -> tuple[Any, int]:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(audio.T.copy()), rate

    def save(target: Any, wav: Any, sample_rate: int, **_: Any) -> None:
        soundfile.write(target, wav[0].numpy(), sample_rate, format="WAV", subtype="FLOAT")

    torchaudio.load, torchaudio.save = load, save
    s3tokenizer.load_model = _OnnxSpeechTokenizer
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    token2wav = importlib.import_module("token2wav")
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, 6561, 60)]
    with tempfile.TemporaryDirectory() as scratch:
        directory = build_token2wav_dir(Path(scratch) / "token2wav")
        prompt_path = Path(scratch) / "prompt.wav"
        prompt = tone_speech(2.0, 22050, 5).astype(np.float32)
        soundfile.write(prompt_path, prompt, 22050, subtype="FLOAT")
        torch.manual_seed(0)  # both flows draw their noise buffer at construction
        theirs = token2wav.Token2wav(str(directory))
        reference_audio = soundfile.read(io.BytesIO(theirs(tokens, str(prompt_path))), dtype="float32")[0]
        torch.manual_seed(0)
        ours = Token2Wav(directory)
        audio = ours.decode(tokens, ours.voice(soundfile.read(prompt_path, dtype="float32")[0], 22050))
    return {
        "samples": [len(audio), len(reference_audio)],
        "max_diff": float(np.abs(audio - reference_audio).max()) if len(audio) == len(reference_audio) else None,
        "scale": float(np.abs(reference_audio).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stepaudio2_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of stepfun-ai/Step-Audio2")
    parser.add_argument("--model-code", type=Path, required=True, help="folder with modeling_step_audio_2.py, configuration_step_audio_2.py")
    args = parser.parse_args(argv)
    from models.stepaudio2_token2wav import import_stepaudio2_modules

    import_stepaudio2_modules()  # the package `stepaudio2`, before the reference's `stepaudio2.py` is on the path
    report = compare(args.reference.resolve(), args.model_code.resolve())
    report["token2wav"] = compare_token2wav(args.reference.resolve())
    print(json.dumps(report, indent=2))
    cases_ = report["cases"].values()
    ok = all(
        c["ids_equal"] and c["greedy_reply_equal"] and c["logits_max_diff"] is not None and c["logits_max_diff"] <= LOGIT_TOLERANCE
        for c in cases_
    )
    audio = report["token2wav"]
    close = audio["max_diff"] is not None and audio["max_diff"] <= TOKEN2WAV_TOLERANCE * audio["scale"]
    return 0 if ok and close else 1


if __name__ == "__main__":
    sys.exit(main())
