"""The whole configuration as one typed tree, filled from CLI flags and VOICE_AGENT_* variables.

A flag beats its environment variable, which beats the default. Every value is checked here, so a
bad one fails at startup with one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ENV_PREFIX = "VOICE_AGENT_"
PROFILES = ("embedded", "loopback", "stepaudio")
ASR_ENGINES = ("moonshine", "whisper")
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag."""


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server, given to both the server's peer and the browser."""

    urls: str
    username: str | None = None
    credential: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"urls": self.urls}
        if self.username is not None:
            out["username"] = self.username
            out["credential"] = self.credential
        return out


@dataclass(frozen=True)
class ServerConfig:
    """HTTP, TLS, ICE and session-limit settings of the transport."""

    host: str = "127.0.0.1"
    port: int = 8080
    cert: Path | None = None
    key: Path | None = None
    ice_servers: tuple[IceServer, ...] = ()
    loopback_ice: bool = False
    max_sessions: int = 16
    max_body_bytes: int = 64 * 1024
    ping_timeout_s: float = 3.0  # a client that sends data-channel pings: quiet this long ends the call
    media_timeout_s: float = 5.0  # any other: no audio and no message this long ends the call
    connect_timeout_s: float = 5.0  # an offer's slot is held this long for the peer's first audio or message
    auth_token: str | None = None  # when set, /api/* and /ws need it as a bearer token
    allowed_origins: tuple[str, ...] = ()  # pages elsewhere than this server that may use it
    offers_per_minute: int = 20  # per client address
    pending_offers_per_address: int = 4  # answered offers not connected yet, per client address
    ws_send_queue_s: float = 5.0  # /ws: messages a client has not read, beyond the socket's buffer
    data_dir: Path = Path("data")


@dataclass(frozen=True)
class LoopbackConfig:
    """The loopback diagnostic profile: the caller's audio comes back after a fixed delay."""

    delay_ms: int = 1000


VAD_ENGINES = ("silero", "webrtc")


@dataclass(frozen=True)
class TurnConfig:
    """Turn-taking: the VAD and the endpointer's thresholds, and how much the client buffers.

    Everything but the engine can also be changed per session through `session.update`.
    """

    vad: str = "silero"
    webrtc_aggressiveness: int = 2
    # "semantic": see min/max_commit_ms; "vad": commit after commit_ms of silence; "manual": the
    # client commits each turn (`input_audio_buffer.commit`), as with push-to-talk
    type: str = "semantic"
    eagerness: str = "medium"  # semantic: how readily a pause counts as the end ("low", "medium", "high")
    threshold: float = 0.5
    min_speech_ms: int = 150
    prefix_padding_ms: int = 300
    pause_ms: int = 250  # vad: silence that starts the speculative reply
    # semantic: the same, sooner, so that a reply is ready when a turn judged complete is committed
    semantic_pause_ms: int = 120
    commit_ms: int = 750
    min_commit_ms: int = 250  # semantic: silence before a turn judged complete is committed
    max_commit_ms: int = 2000  # semantic: silence that commits a turn judged unfinished
    bargein_min_speech_ms: int = 200
    # Speech over the agent: this much voiced audio pauses its audio at once; speech confirmed as
    # such (bargein_min_speech_ms) that stays shorter than backchannel_max_ms and holds no words
    # but a backchannel ("mm-hmm", "okay") lets it resume. 0: every confirmed speech is a barge-in.
    agent_pause_ms: int = 40
    backchannel_max_ms: int = 1000
    # Speech that starts before the user has heard this much of a reply continues their utterance:
    # the commit cut into a hesitation; the reply is dropped and the whole utterance answered anew.
    merge_heard_ms: int = 500
    client_buffer_ms: int = 120

    # Per-session limits for session.update: (low, high) inclusive.
    LIMITS = {
        "threshold": (0.05, 0.95),
        "min_speech_ms": (20, 2000),
        "prefix_padding_ms": (0, 2000),
        "pause_ms": (60, 5000),
        "semantic_pause_ms": (60, 5000),
        "commit_ms": (100, 10000),
        "min_commit_ms": (60, 5000),
        "max_commit_ms": (200, 10000),
        "bargein_min_speech_ms": (20, 5000),
        "agent_pause_ms": (20, 5000),
        "backchannel_max_ms": (0, 5000),
        "merge_heard_ms": (0, 5000),
        "client_buffer_ms": (0, 2000),
    }

    CHOICES = {"type": ("vad", "semantic", "manual"), "eagerness": ("low", "medium", "high")}

    def updated(self, changes: dict[str, Any]) -> "TurnConfig":
        """A copy with `changes` applied, or ValueError naming the first bad field."""
        for key, value in changes.items():
            if key in self.CHOICES:
                if value not in self.CHOICES[key]:
                    raise ValueError(f"turn_detection.{key} must be one of {list(self.CHOICES[key])}")
                continue
            if key not in self.LIMITS:
                raise ValueError(f"unknown turn_detection field {key!r}; known: {sorted([*self.CHOICES, *self.LIMITS])}")
            low, high = self.LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"turn_detection.{key} must be a number in [{low}, {high}]")
            if key != "threshold" and value != int(value):
                raise ValueError(f"turn_detection.{key} must be a whole number of ms")
        merged = dataclasses.replace(
            self, **{k: (v if k in ("threshold", *self.CHOICES) else int(v)) for k, v in changes.items()}
        )
        if merged.commit_ms <= merged.pause_ms:
            raise ValueError("turn_detection.commit_ms must be greater than pause_ms")
        if merged.max_commit_ms <= max(merged.semantic_pause_ms, merged.min_commit_ms):
            raise ValueError("turn_detection.max_commit_ms must be greater than semantic_pause_ms and min_commit_ms")
        return merged

    @property
    def semantic(self) -> bool:
        return self.type == "semantic"

    @property
    def pause_after_ms(self) -> int:
        """Silence that makes a pause: the speculative reply starts."""
        return self.semantic_pause_ms if self.semantic else self.pause_ms

    @property
    def commit_after_ms(self) -> int | None:
        """Silence that commits a turn whatever it sounds like (None: only the client commits)."""
        if self.type == "manual":
            return None
        return self.max_commit_ms if self.semantic else self.commit_ms

    def with_session(self, session: dict[str, Any]) -> "TurnConfig":
        """A copy changed by a `session.update`'s `session` object, or ValueError saying what is wrong."""
        unknown = set(session) - {"turn_detection"}
        if unknown:
            raise ValueError(f"unknown session fields {sorted(unknown)}; known: ['turn_detection']")
        changes = session.get("turn_detection", {})
        if not isinstance(changes, dict):
            raise ValueError("turn_detection must be an object")
        return self.updated(changes)

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("vad", *self.CHOICES, *self.LIMITS)}


DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a spoken conversation. Answer in one or two short, "
    "plain sentences that sound natural when read aloud. No lists, no markdown, no emoji."
)


@dataclass(frozen=True)
class ModelConfig:
    """The embedded profile's models: which LM answers, how it is prompted, how hard they work."""

    asr: str = "moonshine"  # or "whisper"
    lm: str = "embedded"  # "embedded" (llama.cpp), "openai" or "hf:<directory>" (transformers)
    lm_url: str = "http://127.0.0.1:8000/v1"
    lm_model: str = "default"
    lm_api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = 60
    max_sentences: int = 2  # a reply ends with its second sentence; 0: no limit
    temperature: float = 0.0
    history_tokens: int = 600
    asr_partial_ms: int = 500
    lm_slots: int = 4  # generations the embedded LM runs at once, in one batch
    tools: str | None = None  # a Python module whose functions the LM may call
    builtin_tools: bool = True  # the time, arithmetic and unit conversion
    tool_timeout_s: float = 5.0  # a call that takes longer fails (its output says so)
    tool_filler_ms: int = 700  # a call still running after this gets "One moment." spoken
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)  # for all the models together

    @property
    def hf_path(self) -> Path | None:
        return Path(self.lm[3:]) if self.lm.startswith("hf:") else None


@dataclass(frozen=True)
class StepAudioConfig:
    """The stepaudio profile: where the weights are, where Step-Audio-Chat runs, which voice speaks."""

    model_path: Path | None = None  # holds Step-Audio-Tokenizer/, Step-Audio-Chat/, Step-Audio-TTS-3B/
    chat: str = "local"  # "local" (transformers in this process) or "served" (--lm-url, e.g. vLLM)
    device: str = "auto"  # "auto" takes the GPU when there is one
    speaker: str = "Tingting"
    clone: Path | None = None  # a voice file {"speaker", "prompt_text", "wav_path"} to speak with
    tts_prompts: Path | None = None  # {"without_speaker", "with_speaker" (with {speaker}), "rap", "humming"}
    speakers: Path | None = None  # the speaker registry folder; default Step-Audio-TTS-3B/speakers
    dtype: str = "auto"  # TTS-3B's and the flow's: auto is bfloat16 on a GPU, float32 on the CPU
    transcribe: bool = True  # transcribe each user turn with the Chat model, for the text history


@dataclass(frozen=True)
class LogConfig:
    json: bool = False
    level: str = "info"


@dataclass(frozen=True)
class AppConfig:
    """The root of the configuration tree."""

    profile: str = "embedded"
    server: ServerConfig = field(default_factory=ServerConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    loopback: LoopbackConfig = field(default_factory=LoopbackConfig)
    stepaudio: StepAudioConfig = field(default_factory=StepAudioConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for the startup log, with credentials masked."""
        out = dataclasses.asdict(self)
        for server in out["server"]["ice_servers"]:
            if server.get("credential"):
                server["credential"] = "***"
        if out["server"]["auth_token"]:
            out["server"]["auth_token"] = "***"
        return json.loads(json.dumps(out, default=str))


def parse_ice_server(text: str) -> IceServer:
    """`URL` or `URL,username,credential`, e.g. `turn:turn.example.com:3478,alice,s3cret`."""
    parts = [p.strip() for p in text.split(",")]
    url = parts[0]
    scheme = url.split(":", 1)[0]
    if scheme not in ICE_SCHEMES or ":" not in url or not url.split(":", 1)[1]:
        raise ValueError(f"expected a stun:/stuns:/turn:/turns: URL, got {url!r}")
    if len(parts) == 1:
        if scheme.startswith("turn"):
            raise ValueError("a TURN server needs URL,username,credential")
        return IceServer(url)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError("expected URL or URL,username,credential")
    return IceServer(url, parts[1], parts[2])


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535 (0 picks a free port)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _module_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", text):
        raise ValueError("must be a Python module name, such as my_tools or package.tools")
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _lm_backend(text: str) -> str:
    if text in ("embedded", "openai"):
        return text
    if text.startswith("hf:"):
        if not Path(text[3:]).is_dir():
            raise ValueError(f"no such model directory: {text[3:]!r}")
        return text
    raise ValueError(f"must be embedded, openai or hf:<directory>; got {text!r}")


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise ValueError("must be in [0, 2] (0 = greedy)")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"no such directory: {text}")
    return path


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return check


@dataclass(frozen=True)
class _Flag:
    name: str  # "--max-sessions"
    kind: Callable[[str], Any]
    help: str
    repeat: bool = False
    switch: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


_FLAGS: tuple[_Flag, ...] = (
    _Flag("--host", str, "address to listen on (default 127.0.0.1)"),
    _Flag("--port", _port, "HTTP(S) port (default 8080; 0 picks a free one)"),
    _Flag("--profile", _choice(PROFILES), "embedded (offline models on the CPU), loopback (echo diagnostic) or stepaudio (Step-Audio weights, --model-path); default embedded"),
    _Flag(
        "--ice-server",
        parse_ice_server,
        "STUN/TURN server as URL or URL,username,credential; repeatable "
        "(env: separate several with ';')",
        repeat=True,
    ),
    _Flag("--loopback-ice", _bool, "offer only 127.0.0.1 ICE candidates", switch=True),
    _Flag("--auth-token", _non_empty, "require this bearer token on /api/* and /ws (the page takes it as #token=...); prefer the environment variable"),
    _Flag("--allowed-origin", _non_empty, "a web origin other than this server's own whose pages may use it (e.g. https://app.example.com); repeatable", repeat=True),
    _Flag("--ws-send-queue-s", _positive_float, "/ws: close a client that leaves this much audio unread beyond a 64 KiB socket buffer (default 5)"),
    _Flag("--pending-offers-per-address", _positive_int, "answered offers from one address that may wait to connect at once before HTTP 429 (default 4)"),
    _Flag("--offers-per-minute", _positive_int, "offers one client address may make in a minute before HTTP 429 (default 20)"),
    _Flag("--cert", _existing_file, "TLS certificate (PEM) to serve HTTPS"),
    _Flag("--key", _existing_file, "TLS private key (PEM) to serve HTTPS"),
    _Flag("--max-sessions", _positive_int, "simultaneous sessions before HTTP 503 (default 16)"),
    _Flag("--max-body-bytes", _positive_int, "largest accepted request body (default 65536)"),
    _Flag("--ping-timeout-s", _positive_float, "close a call that sent data-channel pings after this long without audio or a message (default 3)"),
    _Flag("--media-timeout-s", _positive_float, "close a call that sends no pings after this long without audio or a message (default 5)"),
    _Flag("--connect-timeout-s", _positive_float, "free an answered offer's slot if no audio or message came in this long (default 5)"),
    _Flag("--data-dir", Path, "where session transcripts are written (default ./data)"),
    _Flag("--loopback-delay-ms", _non_negative_int, "loopback profile: echo delay (default 1000)"),
    _Flag("--vad", _choice(VAD_ENGINES), "speech detector: silero or webrtc (default silero)"),
    _Flag("--webrtc-aggressiveness", _choice(("0", "1", "2", "3")), "webrtcvad strictness 0-3 (default 2)"),
    _Flag("--threshold", float, "speech probability threshold (default 0.5)"),
    _Flag("--min-speech-ms", int, "speech needed to start a turn (default 150)"),
    _Flag("--prefix-padding-ms", int, "audio kept before the speech onset (default 300)"),
    _Flag("--pause-ms", int, "silence that starts a speculative reply, --turn-detection vad (default 250)"),
    _Flag("--semantic-pause-ms", int, "silence that starts a speculative reply, --turn-detection semantic (default 120)"),
    _Flag("--commit-ms", int, "silence that ends the turn and plays the reply, --turn-detection vad (default 750)"),
    _Flag("--turn-detection", _choice(TurnConfig.CHOICES["type"]), "semantic: an end-of-turn model and a text check decide (the default); vad: commit after --commit-ms of silence; manual: the client commits each turn"),
    _Flag("--eagerness", _choice(("low", "medium", "high")), "semantic: how readily a pause ends the turn (default medium)"),
    _Flag("--min-commit-ms", int, "semantic: silence before a turn judged complete is committed (default 250)"),
    _Flag("--max-commit-ms", int, "semantic: silence that commits a turn judged unfinished (default 2000)"),
    _Flag("--bargein-min-speech-ms", int, "speech needed to interrupt the agent (default 200)"),
    _Flag("--agent-pause-ms", int, "voiced audio over the agent that pauses its audio until the sound proves a turn or not (default 40)"),
    _Flag("--merge-heard-ms", int, "speech that starts before the user heard this much of a reply continues their utterance (default 500)"),
    _Flag("--backchannel-max-ms", int, "speech over the agent shorter than this, with no words or only a backchannel ('mm-hmm'), lets it resume; 0: never (default 1000)"),
    _Flag("--client-buffer-ms", int, "agent audio assumed buffered at the client when it reports no position (default 120)"),
    _Flag("--asr", _choice(ASR_ENGINES), "embedded profile's ASR: moonshine (Moonshine tiny-en) or whisper (Whisper tiny.en); default moonshine"),
    _Flag("--lm", _lm_backend, "embedded profile's LM: embedded (SmolLM2 in llama.cpp), openai (--lm-url) or hf:<directory> (transformers)"),
    _Flag("--lm-url", _http_url, "OpenAI-compatible API base URL for --lm openai (default http://127.0.0.1:8000/v1)"),
    _Flag("--lm-model", _non_empty, "model name sent to --lm-url (default 'default')"),
    _Flag("--lm-api-key-env", _non_empty, "environment variable holding the --lm-url API key (default OPENAI_API_KEY)"),
    _Flag("--system-prompt", _non_empty, "the LM's system prompt (default: a short spoken-style prompt)"),
    _Flag("--tools", _module_name, "a Python module whose functions (type hints, docstrings) the LM may call"),
    _Flag("--builtin-tools", _bool, "offer the built-in tools: time and date, arithmetic, unit conversion (default true)"),
    _Flag("--tool-timeout-s", _positive_float, "a tool call that runs longer fails, and the LM is told (default 5)"),
    _Flag("--tool-filler-ms", _non_negative_int, "a tool call still running after this gets a spoken 'One moment.' (default 700)"),
    _Flag("--max-new-tokens", _positive_int, "longest reply in tokens (default 60)"),
    _Flag("--max-sentences", _non_negative_int, "a reply ends with this sentence; 0 for no limit (default 2)"),
    _Flag("--temperature", _temperature, "LM sampling temperature; 0 is greedy (default 0)"),
    _Flag("--history-tokens", _positive_int, "dialog history the LM sees, in tokens (default 600)"),
    _Flag("--asr-partial-ms", _positive_int, "new speech between partial transcripts (default 500)"),
    _Flag("--model-threads", _positive_int, "CPU threads the models share: the LM gets all but one, ASR and speech one each (default: the machine's cores)"),
    _Flag("--lm-slots", _positive_int, "embedded LM: replies generated at once, in one batch (default 4)"),
    _Flag("--model-path", _existing_dir, "stepaudio profile: directory holding the Step-Audio model directories"),
    _Flag("--stepaudio-chat", _choice(("local", "served")), "stepaudio profile: Chat in this process, or served at --lm-url (default local)"),
    _Flag("--stepaudio-device", _non_empty, "stepaudio profile: torch device for tokenizer and TTS (default auto)"),
    _Flag("--stepaudio-speaker", _non_empty, "stepaudio profile: TTS-3B speaker from speakers_info.json (default Tingting)"),
    _Flag("--stepaudio-clone", _existing_file, "stepaudio profile: JSON voice file {speaker, prompt_text, wav_path} to clone"),
    _Flag("--stepaudio-tts-prompts", _existing_file, "stepaudio profile: JSON with TTS-3B system prompts (without_speaker, with_speaker, rap, humming)"),
    _Flag("--stepaudio-speakers", _existing_dir, "stepaudio profile: speaker registry folder (speakers_info.json, *_prompt.wav); default the TTS-3B folder's speakers/"),
    _Flag("--stepaudio-dtype", _choice(("auto", "float32", "bfloat16")), "stepaudio profile: dtype of TTS-3B and the flow (default auto: bfloat16 on a GPU)"),
    _Flag("--stepaudio-transcribe", _bool, "stepaudio profile: transcribe user turns with Chat for the history (default true)"),
    _Flag("--log-json", _bool, "log JSON lines instead of readable console lines", switch=True),
    _Flag("--log-level", _choice(("debug", "info", "warning", "error")), "log level (default info)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_server.py",
        description="Real-time full-duplex voice agent server. Every flag also reads "
        f"{ENV_PREFIX}<FLAG_NAME> from the environment.",
    )
    for flag in _FLAGS:
        help_text = f"{flag.help} [env {flag.env}]"
        if flag.switch:
            parser.add_argument(flag.name, action="store_const", const="true", default=None, help=help_text)
        elif flag.repeat:
            parser.add_argument(flag.name, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag.name, default=None, metavar="VALUE", help=help_text)
    return parser


def _convert(flag: _Flag, raw: str) -> Any:
    try:
        return flag.kind(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{flag.name}: {exc}") from None


def load_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> AppConfig:
    """Parse flags and environment into an AppConfig, or raise ConfigError naming the flag."""
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for flag in _FLAGS:
        raw = args[flag.dest]
        if raw is None and flag.env in environ:
            env_raw = environ[flag.env]
            raw = [part for part in env_raw.split(";") if part.strip()] if flag.repeat else env_raw
        if raw is None:
            continue
        values[flag.dest] = [_convert(flag, r) for r in raw] if flag.repeat else _convert(flag, raw)

    if ("cert" in values) != ("key" in values):
        raise ConfigError("--cert/--key: give both or neither")

    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    server = ServerConfig(
        **{k: v for k, v in values.items() if k in server_fields},
        ice_servers=tuple(values.get("ice_server", ())),
        allowed_origins=tuple(values.get("allowed_origin", ())),
    )
    loopback = LoopbackConfig(delay_ms=values.get("loopback_delay_ms", LoopbackConfig.delay_ms))
    turn = TurnConfig(
        vad=values.get("vad", TurnConfig.vad),
        webrtc_aggressiveness=int(values.get("webrtc_aggressiveness", TurnConfig.webrtc_aggressiveness)),
    )
    thresholds = {k: values[k] for k in TurnConfig.LIMITS if k in values}
    thresholds |= {k: values[flag] for k, flag in (("type", "turn_detection"), ("eagerness", "eagerness")) if flag in values}
    try:
        turn = turn.updated(thresholds)
    except ValueError as exc:
        # "turn_detection.commit_ms must be ..." -> "--commit-ms: must be ..."
        message = str(exc)
        for key in TurnConfig.LIMITS:
            if f"turn_detection.{key}" in message:
                flag = "--" + key.replace("_", "-")
                message = message.replace(f"turn_detection.{key} ", "")
                raise ConfigError(f"{flag}: {message}") from None
        raise ConfigError(message) from None
    log = LogConfig(json=values.get("log_json", False), level=values.get("log_level", "info"))
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    models = ModelConfig(
        **{k: v for k, v in values.items() if k in model_fields},
        **({"threads": values["model_threads"]} if "model_threads" in values else {}),
    )
    stepaudio = StepAudioConfig(
        **{k.removeprefix("stepaudio_"): v for k, v in values.items() if k == "model_path" or k.startswith("stepaudio_")}
    )
    profile = values.get("profile", AppConfig.profile)
    if profile == "stepaudio" and stepaudio.model_path is None:
        raise ConfigError("--model-path: the stepaudio profile needs the directory holding the Step-Audio models")
    return AppConfig(
        profile=profile,
        server=server,
        turn=turn,
        models=models,
        loopback=loopback,
        stepaudio=stepaudio,
        log=log,
    )
