"""A tiny random Step-Audio 2 mini directory in the published layout: `config.json` (`text_config`
for the Qwen2 decoder, `audio_encoder_config`), safetensors weights under the published names, and
a byte-level tokenizer whose ids put the reference's fixed ids where the reference expects them
(`<audio_start>` 151688, text below it, `<audio_0>` at 151696). The other special tokens' ids are
this tokenizer's own: the reference looks them up by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB_SIZE = 158720
AUDIO_TOKENS = 6561  # CosyVoice2's speech tokens
SPECIALS = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151665: "<|EOT|>",
    151666: "<|BOT|>",
    151688: "<audio_start>",
    151689: "<audio_end>",
    151690: "<audio_patch>",
    151693: "<tts_start>",
    151694: "<tts_end>",
    151695: "<tts_pad>",  # a free id: the vLLM fork pads a reply laid out again with it
}
SPECIAL_IDS = {name: i for i, name in SPECIALS.items()}
AUDIO_BASE = 151696
TEXT_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_attention_groups": 2,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}
ENCODER_CONFIG = {
    "n_mels": 128,
    "n_audio_ctx": 1500,
    "n_audio_state": 16,
    "n_audio_head": 2,
    "n_audio_layer": 2,
    "llm_dim": 32,
    "kernel_size": 3,
    "adapter_stride": 2,
}


def build_tokenizer(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from testkit.stepaudio_tiny import byte_symbols

    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    names = {i: f"<unused_{i}>" for i in range(256, VOCAB_SIZE)}
    names |= SPECIALS | {AUDIO_BASE + n: f"<audio_{n}>" for n in range(AUDIO_TOKENS)}
    backend.add_special_tokens([AddedToken(names[i], special=True) for i in range(256, VOCAB_SIZE)])
    assert backend.token_to_id("<audio_start>") == 151688 and backend.token_to_id("<audio_0>") == AUDIO_BASE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="right"
    )
    tokenizer.save_pretrained(directory)


def build_model_dir(directory: Path, seed: int = 0) -> Path:
    """The whole tiny model directory (weights random, seeded)."""
    import torch
    from safetensors.torch import save_file

    from models.stepaudio2_lm import StepAudio2Model

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["StepAudio2ForCausalLM"],
        "model_type": "step_audio_2",
        "auto_map": {
            "AutoConfig": "configuration_step_audio_2.StepAudio2Config",
            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM",
        },
        "text_config": TEXT_CONFIG,
        "audio_encoder_config": ENCODER_CONFIG,
        "torch_dtype": "bfloat16",
    }
    torch.manual_seed(seed)
    model = StepAudio2Model(config)
    with torch.no_grad():  # the encoder's default init is flat: spread it as a trained one is
        for name, weight in model.encoder.named_parameters():
            if name.endswith("weight") and weight.dim() > 1:
                weight.normal_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(directory)
    return directory


# The published flow.yaml's layout and StepFun's module paths, at tiny sizes (the published
# sizes: encoder 512 wide, 8 heads, 6 + 4 blocks; estimator 16 blocks of 8 heads of 64, 512 wide).
FLOW_YAML = """\
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: 192
    output_type: mel
    vocab_size: 6561
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: 32
        output_size: 32
        input_layer: linear
        pre_lookahead_len: 3
        num_blocks: 1
        num_up_blocks: 1
        up_stride: 2
        up_scale_factor: 2
        attention_heads: 2
        pos_enc_layer_type: rel_pos_espnet
        selfattention_layer_type: rel_selfattn
        key_bias: true
        linear_units: 64
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: true
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 4.0
            depth: 2
            num_heads: 2
            head_dim: 16
            hidden_size: 64
"""


def build_token2wav_dir(directory: Path, seed: int = 0) -> Path:
    """`token2wav/`: the flow (tiny), HiFT at its published size (the reference builds it with no
    settings), CAM++ and the v2 speech tokenizer (tiny ONNX models with their interfaces)."""
    import re

    import torch
    from hyperpyyaml import load_hyperpyyaml

    from models.stepaudio2_token2wav import import_stepaudio2_modules
    from testkit.stepaudio_tiny import build_campplus_onnx, build_speech_tokenizer_onnx

    import_stepaudio2_modules()
    from stepaudio2.flashcosyvoice.modules.hifigan import HiFTGenerator

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "flow.yaml").write_text(FLOW_YAML)
    torch.manual_seed(seed)
    flow = load_hyperpyyaml(re.sub(r"!new:cosyvoice2\.", "!new:stepaudio2.cosyvoice2.", FLOW_YAML))["flow"]
    with torch.no_grad():  # DiT starts its output and modulation layers at zero: a trained one's are not
        for weight in flow.parameters():
            if not weight.any():
                weight.normal_(0.0, 0.05)
    torch.save(flow.state_dict(), directory / "flow.pt")
    torch.save({f"generator.{k}": v for k, v in HiFTGenerator().state_dict().items()}, directory / "hift.pt")
    build_campplus_onnx(directory / "campplus.onnx", seed, rectified=True)
    build_speech_tokenizer_onnx(directory / "speech_tokenizer_v2_25hz.onnx", seed + 2, codes=6561)
    return directory


LEARNT_LOSS = 0.002  # a reply's mean cross-entropy: each pick ~99.8 % sure
LEARNT_STEPS = 3  # steps in a row, each on speech not heard before, that every reply is learnt


Lesson = tuple[list[int], list, list[int]]  # a prompt's ids, its audio windows' mels, the reply's ids


def teach(directory: Path, lessons: Callable[[np.random.Generator], list[Lesson]], steps: int = 800, seed: int = 0) -> int:
    """Train the tiny model's decoder in `directory` to answer each lesson's prompt with its reply,
    and save it there: a model that writes what a test needs (speech with text between, a function
    call) through the real code. `lessons(rng)` gives the lessons anew each step, with other speech
    (other lengths, other sounds), so that a reply follows from the text of the prompt whatever
    speech a call brings. The softmax is taken over the ids the lessons use and a sample of the
    rest; the untrained ids' logits stay near zero, far under the learnt ones. Returns the steps it
    took: it stops once LEARNT_STEPS steps in a row learnt every reply on their new speech."""
    import torch
    from safetensors.torch import save_file

    from models.stepaudio2_lm import StepAudio2Model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = StepAudio2Model.load(directory)
    for part in (model.encoder, model.adapter):
        part.requires_grad_(False)
    drawn = lessons(rng)
    used = {i for ids, _, reply in drawn for i in ids + reply}
    vocab = torch.tensor(sorted(used | set(torch.randperm(VOCAB_SIZE)[:2048].tolist())))
    index = {int(i): n for n, i in enumerate(vocab.tolist())}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    learnt_in_a_row = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        learnt = True
        for ids, mels, reply in drawn:
            with torch.no_grad():  # the encoder's features of this speech, as the model makes them
                heard = model.embed(ids + reply[:-1], mels)
            tokens = torch.tensor([ids + reply[:-1]])
            patches = (tokens == SPECIAL_IDS["<audio_patch>"])[..., None]
            embeds = torch.where(patches, heard, model.model.embed_tokens(tokens))
            hidden = model.model(inputs_embeds=embeds).last_hidden_state[0, len(ids) - 1 :]
            loss = torch.nn.functional.cross_entropy(hidden @ model.lm_head.weight[vocab].T, torch.tensor([index[i] for i in reply]))
            loss.backward()
            learnt = learnt and loss.item() < LEARNT_LOSS
        learnt_in_a_row = learnt_in_a_row + 1 if learnt else 0
        if learnt_in_a_row == LEARNT_STEPS:
            break
        optimizer.step()
        drawn = lessons(rng)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    return step
