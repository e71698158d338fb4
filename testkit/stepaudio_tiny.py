"""Tiny random Step-Audio models in the real directory layout, built with the real libraries.

The real weights cannot be had on these machines; these stand in for them so that the real loaders
and the real streaming code run end to end. Shapes are tiny, keys and file names are the real ones
(the README's stepaudio section). Used by the tests and by `bench/stepaudio_smoke.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PARAFORMER_DIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
ENCODER_DIM = 16  # the real encoder's frames are 512-d

_PARAFORMER_CONFIG = """\
model: ParaformerStreaming
model_conf:
    ctc_weight: 0.0
    lsm_weight: 0.1
    length_normalized_loss: true
    predictor_weight: 1.0
    predictor_bias: 1
    sampling_ratio: 0.75
encoder: SANMEncoderChunkOpt
encoder_conf:
    output_size: {dim}
    attention_heads: 2
    linear_units: 32
    num_blocks: 2
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    attention_dropout_rate: 0.1
    input_layer: pe_online
    pos_enc_class: SinusoidalPositionEncoder
    normalize_before: true
    kernel_size: 11
    sanm_shfit: 0
    selfattention_layer_type: sanm
    chunk_size: [12, 15]
    stride: [8, 10]
    pad_left: [0, 0]
    encoder_att_look_back_factor: [4, 4]
    decoder_att_look_back_factor: [1, 1]
decoder: ParaformerSANMDecoder
decoder_conf:
    attention_heads: 2
    linear_units: 32
    num_blocks: 1
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    self_attention_dropout_rate: 0.1
    src_attention_dropout_rate: 0.1
    att_layer_num: 1
    kernel_size: 11
    sanm_shfit: 5
predictor: CifPredictorV2
predictor_conf:
    idim: {dim}
    threshold: 1.0
    l_order: 1
    r_order: 1
    tail_threshold: 0.45
frontend: WavFrontendOnline
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: 80
    frame_length: 25
    frame_shift: 10
    lfr_m: 7
    lfr_n: 6
    dither: 0.0
specaug: null
tokenizer: CharTokenizer
tokenizer_conf:
    unk_symbol: <unk>
"""


def _write_cmvn(path: Path, rng: np.random.Generator, dim: int = 560) -> None:
    """Kaldi nnet text form, as funasr's `am.mvn` reader expects it."""
    shift = " ".join(f"{v:.4f}" for v in -rng.uniform(8, 14, dim))
    scale = " ".join(f"{v:.4f}" for v in rng.uniform(0.2, 0.4, dim))
    path.write_text(
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n</Nnet>\n"
    )


def build_paraformer(directory: Path, seed: int = 0) -> None:
    import torch
    from funasr.register import tables
    from omegaconf import OmegaConf

    import funasr  # noqa: F401  (fills the registry)

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<blank>", "<s>", "</s>", "<unk>", *"abcdefghij"]
    (directory / "tokens.json").write_text(json.dumps(tokens))
    (directory / "config.yaml").write_text(_PARAFORMER_CONFIG.format(dim=ENCODER_DIM))
    _write_cmvn(directory / "am.mvn", rng)
    config = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"))
    torch.manual_seed(seed)
    parts = {key: config[key] for key in ("encoder", "encoder_conf", "decoder", "decoder_conf", "predictor", "predictor_conf")}
    model = tables.model_classes[config["model"]](**config["model_conf"], **parts, input_size=80 * 7, vocab_size=len(tokens))
    torch.save(model.state_dict(), directory / "model.pt")


def build_speech_tokenizer_onnx(path: Path, seed: int = 0, codes: int = 4096) -> None:
    """`speech_tokenizer_v1.onnx`'s interface (v2's, with `codes` 6561): feats (1, 128, T) float,
    feats_length (1,) int32 -> int tokens (1, T // 4) at 25 Hz. Inside: each frame plus the mean of all frames (standing in for
    full attention: every code depends on the whole window), one strided convolution, an argmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((codes, 128, 4)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("ReduceMean", ["feats"], ["context"], axes=[2], keepdims=1),
        helper.make_node("Add", ["feats", "context"], ["attended"]),
        helper.make_node("Conv", ["attended", "w"], ["logits"], strides=[4], kernel_shape=[4]),
        helper.make_node("ArgMax", ["logits"], ["codes"], axis=1, keepdims=0),
        helper.make_node("Cast", ["codes"], ["indices"], to=TensorProto.INT32),
        helper.make_node("Identity", ["feats_length"], ["unused_length"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_speech_tokenizer",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1]),
        ],
        [
            helper.make_tensor_value_info("indices", TensorProto.INT32, [1, "N"]),
            helper.make_tensor_value_info("unused_length", TensorProto.INT32, [1]),
        ],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_tokenizer_dir(directory: Path, seed: int = 0) -> Path:
    """`Step-Audio-Tokenizer/`: the Paraformer dir, the 1024 centroids, the vq06 ONNX model."""
    build_paraformer(directory / PARAFORMER_DIR, seed)
    rng = np.random.default_rng(seed + 1)
    np.save(directory / "linguistic_tokenizer.npy", rng.standard_normal((1024, ENCODER_DIM)).astype(np.float32))
    build_speech_tokenizer_onnx(directory / "speech_tokenizer_v1.onnx", seed + 2)
    return directory


def tone_speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like float audio: a gliding voiced tone with syllable-rate amplitude and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)




# -- Step1 LMs (Chat, TTS-3B) ------------------------------------------------------------------

# Step-Audio ships its Step1 modeling code inside each model directory (trust_remote_code); it cannot
# be had here. This stand-in is a Llama under the Step1 names and config keys, so that the remote-code
# loading path (auto_map, trust_remote_code, dtype, device_map) runs for real on the tiny models.
_STEP1_CODE = '''\
from transformers import LlamaConfig, LlamaForCausalLM


class Step1Config(LlamaConfig):
    model_type = "step1"

    def __init__(self, num_attention_groups=None, max_seq_len=4096, **kwargs):
        if num_attention_groups is not None:
            kwargs["num_key_value_heads"] = num_attention_groups
        kwargs.setdefault("max_position_embeddings", max_seq_len)
        super().__init__(**kwargs)
        self.num_attention_groups = num_attention_groups
        self.max_seq_len = max_seq_len


class Step1ForCausalLM(LlamaForCausalLM):
    config_class = Step1Config
'''

VOCAB_SIZE = 74752
BYTE_BASE = 5  # text byte b -> id 5 + b in the tiny tokenizer
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|EOT|>", 4: "<|BOT|>"}


def byte_symbols() -> list[str]:
    """The byte-level pre-tokenizer's printable stand-in for each byte value, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def text_ids(text: str) -> list[int]:
    """What the tiny tokenizer gives for plain text: one id per UTF-8 byte."""
    return [BYTE_BASE + b for b in text.encode("utf-8")]


def build_tokenizer(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in SPECIALS.items()}
    vocab.update({symbol: BYTE_BASE + b for b, symbol in enumerate(byte_symbols())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(SPECIALS[i], special=True) for i in range(5)])
    filler = [AddedToken(f"<unused_{i}>", special=True) for i in range(BYTE_BASE + 256, 65536)]
    audio = [AddedToken(f"<audio_{n}>", special=True) for n in range(5120)]
    tail = [AddedToken(f"<unused_{i}>", special=True) for i in range(65536 + 5120, VOCAB_SIZE)]
    backend.add_special_tokens(filler + audio + tail)
    assert backend.token_to_id("<audio_0>") == 65536 and backend.get_vocab_size() == VOCAB_SIZE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|EOT|>", pad_token="<unk>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)


def build_step1(directory: Path, seed: int = 0, ascii_out: bool = False) -> Path:
    """A Step1 causal LM directory at tiny sizes (Chat and TTS-3B have the same architecture).
    `ascii_out`: the output layer favours printable ASCII, so that a random Chat model says text."""
    import importlib.util

    import torch

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "modeling_step1.py").write_text(_STEP1_CODE)
    config = {
        "architectures": ["Step1ForCausalLM"],
        "model_type": "step1",
        "auto_map": {"AutoConfig": "modeling_step1.Step1Config", "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"},
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "vocab_size": VOCAB_SIZE,
        "max_seq_len": 32768,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "pad_token_id": 0,
        "eos_token_id": 3,
        "torch_dtype": "bfloat16",
    }
    spec = importlib.util.spec_from_file_location("tiny_step1", directory / "modeling_step1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map", "torch_dtype")}
    model = module.Step1ForCausalLM(module.Step1Config(**fields))
    if ascii_out:
        with torch.no_grad():
            printable = [BYTE_BASE + b for b in range(ord(" "), ord("~") + 1)]
            keep = model.lm_head.weight[printable].clone()
            model.lm_head.weight.zero_()
            model.lm_head.weight[printable] = keep * 4.0
            model.lm_head.weight[3] = 0.3 * keep.mean(dim=0) - 0.5  # an end of turn now and then
    model.save_pretrained(directory)
    # save_pretrained writes its own config; the real keys (and auto_map) are what loaders must read.
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(directory)
    return directory


# -- CosyVoice flow + HiFT ---------------------------------------------------------------------

_COSYVOICE_YAML = """\
# tiny sizes, the real structure of CosyVoice-300M-25Hz/cosyvoice.yaml
sample_rate: 22050
spk_embed_dim: 192
token_frame_rate: 41.666666666666664

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: 16
    llm_input_size: 16
    llm_output_size: 16

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 16
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 5120
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 16
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [16]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 0
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.0
    nsf_voiced_threshold: -1.0e+9
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3]
    resblock_dilation_sizes: [[1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16

get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
"""


def build_campplus_onnx(path: Path, seed: int = 0, rectified: bool = False) -> None:
    """CAM++'s interface: fbank (1, T, 80) -> x-vector (1, 192); inside, a time average and a
    matrix. Its input is mean-normalized over time, so the plain average is zero: `rectified`
    averages the magnitudes, so that the x-vector depends on the voice."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((80, 192)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("Abs" if rectified else "Identity", ["input"], ["features"]),
            helper.make_node("ReduceMean", ["features"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["embedding"]),
        ],
        "tiny_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def build_cosyvoice(directory: Path, seed: int = 0) -> Path:
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from models.cosyvoice_decoder import _model_sections, import_cosyvoice

    import_cosyvoice()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cosyvoice.yaml").write_text(_COSYVOICE_YAML)
    torch.manual_seed(seed)
    configs = load_hyperpyyaml(_model_sections(_COSYVOICE_YAML))
    # The F0 head at zero: a constant source, no phase to carry between chunks, so that the vocoder
    # is a pure function of its mel (the streaming test compares it with the one-pass output).
    with torch.no_grad():
        configs["hift"].f0_predictor.classifier.weight.zero_()
        configs["hift"].f0_predictor.classifier.bias.zero_()
    torch.save(configs["flow"].state_dict(), directory / "flow.pt")
    torch.save({f"generator.{k}": v for k, v in configs["hift"].state_dict().items()}, directory / "hift.pt")
    build_campplus_onnx(directory / "campplus.onnx", seed)
    build_speech_tokenizer_onnx(directory / "speech_tokenizer_v1.onnx", seed + 2)
    return directory


SPEAKER = "Tingting"


def build_tts_dir(directory: Path, seed: int = 0) -> Path:
    """`Step-Audio-TTS-3B/`: the Step1 LM, the speaker registry with its prompt wavs, and the normal
    and music CosyVoice decoders."""
    import soundfile

    build_step1(directory, seed + 10)
    speakers = directory / "speakers"
    speakers.mkdir(exist_ok=True)
    info = {SPEAKER: "你好，我是婷婷。", f"{SPEAKER}RAP": "来一段说唱。", f"{SPEAKER}哼唱": "啦啦啦。"}
    for i, name in enumerate(info):
        soundfile.write(speakers / f"{name}_prompt.wav", tone_speech(2.0, 22050, seed + i), 22050)
    (speakers / "speakers_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2))
    build_cosyvoice(directory / "CosyVoice-300M-25Hz", seed)
    build_cosyvoice(directory / "CosyVoice-300M-25Hz-Music", seed + 1)
    return directory


def build_model_path(directory: Path, seed: int = 0) -> Path:
    """A whole `--model-path` directory: tokenizer, Chat and TTS-3B, all tiny."""
    build_tokenizer_dir(directory / "Step-Audio-Tokenizer", seed)
    build_step1(directory / "Step-Audio-Chat", seed + 20, ascii_out=True)
    build_tts_dir(directory / "Step-Audio-TTS-3B", seed)
    return directory
