"""The whole configuration as one typed tree, filled from CLI flags and VOICE_AGENT_* variables.

Each setting is declared once, on its field (`setting(...)`): its flag and environment variable,
its help, its check, and for turn-taking whether a session may change it and within which limits.
`--help`, the README's configuration table (`markdown_table()`) and the loading below are all
read from those declarations. A flag beats its environment variable, which beats the default;
every value is checked here, so a bad one fails at startup with one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from runtime.checks import json_number
from runtime.procfs import usable_cores

ENV_PREFIX = "VOICE_AGENT_"
PROFILES = ("embedded", "loopback", "stepaudio", "stepaudio2")
ASR_ENGINES = ("moonshine", "whisper", "whisper-base")
LM_WEIGHTS = ("q4_0", "q8_0", "shipped")  # models.gguf_reencode.WeightFormat
VAD_ENGINES = ("silero", "webrtc")
ECHO_CANCEL = ("auto", "on", "off")
TURN_DETECTION = ("vad", "semantic", "manual")
EAGERNESS = ("low", "medium", "high")
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")
SETTING = "setting"  # the key of a field's Setting in its metadata


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag."""


class FieldError(ValueError):
    """A value that breaks a rule between fields; `field` names the one to blame."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


# ---- checks of a flag's text ------------------------------------------------------------------


def bounded(kind: Callable[[str], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """A check that reads a number of `kind` and refuses one that is not `ok`, saying `rule`."""

    def check(text: str) -> Any:
        value = kind(text)
        if not ok(value):
            raise ValueError(rule)
        return value

    return check


port = bounded(int, lambda v: 0 <= v <= 65535, "must be 0..65535 (0 picks a free port)")
positive_int = bounded(int, lambda v: v > 0, "must be a positive integer")
non_negative_int = bounded(int, lambda v: v >= 0, "must be >= 0")
positive_float = bounded(float, lambda v: v > 0, "must be > 0")
temperature = bounded(float, lambda v: 0.0 <= v <= 2.0, "must be in [0, 2] (0 = greedy)")


DEFAULT_MAX_LOAD = 0.7  # LiveKit's agent servers stop taking jobs at 0.7 too


def load_limit(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    value = float(text)
    if not 0 < value <= 10:
        raise ValueError("must be a load in (0, 10] or off")
    return value


def module_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", text):
        raise ValueError("must be a Python module name, such as my_tools or package.tools")
    return text


def lm_backend(text: str) -> str:
    if text in ("embedded", "openai"):
        return text
    if text.startswith("hf:"):
        if not Path(text[3:]).is_dir():
            raise ValueError(f"no such model directory: {text[3:]!r}")
        return text
    raise ValueError(f"must be embedded, openai or hf:<directory>; got {text!r}")


def redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {text!r}")
    return text


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"no such directory: {text}")
    return path


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


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


# ---- how a field is set -----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How one field is set from outside: its flag (whose name, upper-cased with `_` for `-`,
    after VOICE_AGENT_, is its environment variable), help, the check of the flag's text, and for
    turn-taking what a session may change (`choices`, or `limits` inclusive)."""

    help: str
    parse: Callable[[str], Any] = str
    flag: str = ""  # default: the field's name, "--" and "-" for "_"
    metavar: str = "VALUE"
    shown_default: str = ""  # what --help and the README say the default is, where it is not the value
    repeat: bool = False  # a flag given again adds a value (in the environment, separated by ';')
    switch: bool = False  # a flag without a value
    choices: tuple[str, ...] = ()
    limits: tuple[float, float] | None = None
    per_session: bool = False  # `session.update` may change it


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **declared: Any) -> Any:
    """A dataclass field with its Setting; `choices` also make its check."""
    if "choices" in declared and "parse" not in declared:
        declared["parse"] = _choice(declared["choices"])
    return field(default=default, default_factory=factory, metadata={SETTING: Setting(**declared)})


def turn_ms(default: int, limits: tuple[int, int], help: str) -> Any:
    """A turn-taking duration in ms that a session may change, within `limits`."""
    return setting(default, parse=int, limits=limits, per_session=True, metavar="MS", help=help)


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return check


@dataclass(frozen=True)
class Declared:
    """A field of the tree with its Setting: where it sits (`path` of field names) and its flag."""

    path: tuple[str, ...]
    field: dataclasses.Field[Any]
    setting: Setting

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def default_text(self) -> str:
        if self.setting.shown_default:
            return self.setting.shown_default
        value = self.field.default
        if self.setting.switch:
            return "off"
        if value is None or value == ():
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        return f"{value:g}" if isinstance(value, float) else str(value)

    def convert(self, raw: str) -> Any:
        try:
            value = self.setting.parse(raw)
            return value if self.setting.limits is None else check_value(self.setting, value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.flag}: {exc}") from None


def declared(cls: type, path: tuple[str, ...] = ()) -> Iterator[Declared]:
    """Every field of the tree under `cls` that has a Setting, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from declared(hints[f.name], (*path, f.name))
        elif SETTING in f.metadata:
            yield Declared((*path, f.name), f, f.metadata[SETTING])


def check_value(setting: Setting, value: Any) -> Any:
    """A per-session value (or a flag's, once parsed) checked against its choices or limits."""
    if setting.choices:
        if value not in setting.choices:
            raise ValueError(f"must be one of {list(setting.choices)}")
        return value
    assert setting.limits is not None
    low, high = setting.limits
    number = json_number(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"must be a number in [{low:g}, {high:g}]")
    if setting.parse is int:
        if number != int(number):
            raise ValueError("must be a whole number of ms")
        return int(number)
    return number


# ---- the tree ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """HTTP, TLS, ICE and session-limit settings of the transport."""

    host: str = setting("127.0.0.1", help="address to listen on; `0.0.0.0` for every interface", metavar="ADDR")
    port: int = setting(8080, parse=port, help="HTTP(S) port; `0` picks a free one", metavar="N")
    ice_servers: tuple[IceServer, ...] = setting(
        (), flag="--ice-server", parse=parse_ice_server, repeat=True, metavar="URL[,user,credential]",
        help="a STUN or TURN server for both the server's peer and the browser; repeatable "
        "(in the environment, separate several with `;`)",
    )
    loopback_ice: bool = setting(
        False, parse=boolean, switch=True,
        help="gather and accept only 127.0.0.1 ICE candidates: tests, the harness, one laptop",
    )
    cert: Path | None = setting(None, parse=existing_file, metavar="FILE", help="serve HTTPS with this PEM certificate (with `--key`)")
    key: Path | None = setting(None, parse=existing_file, metavar="FILE", help="the PEM private key of `--cert`")
    max_sessions: int = setting(16, parse=positive_int, metavar="N", help="simultaneous calls; one more gets HTTP 503")
    max_load: float | None = setting(
        DEFAULT_MAX_LOAD, parse=load_limit, metavar="L",
        help="refuse a new call (HTTP 503 `at_capacity`, with `Retry-After`) when the server's load with it would pass L: "
        "1.0 is a full machine, counting its CPU, event-loop lateness, queued model calls and each call's share of it "
        "(its turn's CPU, timed at start-up); `off`: no limit but `--max-sessions`",
    )
    max_body_bytes: int = setting(64 * 1024, parse=positive_int, metavar="N", help="largest request body; larger gets HTTP 413")
    auth_token: str | None = setting(
        None, parse=non_empty, metavar="T",
        help="require `Authorization: Bearer T` on `/api/*` and `/ws` (see Beyond localhost); prefer the environment variable",
    )
    allowed_origins: tuple[str, ...] = setting(
        (), flag="--allowed-origin", parse=non_empty, repeat=True, metavar="URL",
        help="another web origin whose pages may use the API; repeatable",
    )
    offers_per_minute: int = setting(20, parse=positive_int, metavar="N", help="offers one client address may make in a minute before HTTP 429")
    pending_offers_per_address: int = setting(
        4, parse=positive_int, metavar="N", help="answered offers from one address still waiting to connect; one more gets HTTP 429"
    )
    ping_timeout_s: float = setting(
        3.0, parse=positive_float, metavar="S",
        help="close a WebRTC call that sends data-channel `ping`s after this long without audio or a message",
    )
    media_timeout_s: float = setting(
        5.0, parse=positive_float, metavar="S",
        help="close a WebRTC call that has sent no audio and no message for this long (any client: audio alone "
        "keeps a call up, with or without a data channel)",
    )
    connect_timeout_s: float = setting(
        5.0, parse=positive_float, metavar="S", help="free the slot of an answered offer whose peer sent no audio and no message in this long"
    )
    ws_send_queue_s: float = setting(
        5.0, parse=positive_float, metavar="S",
        help="`/ws`: close a client that leaves this much audio unread beyond a 64 KiB socket buffer",
    )
    echo_cancel: str = setting(
        "auto", choices=ECHO_CANCEL, metavar="MODE",
        help="cancel the echo of the agent's own voice in the caller's microphone, with what the server sent as the reference: "
        "`auto` for each call whose client says it does not cancel echo itself (the page, while the browser's canceller is off), `on`, `off`",
    )
    data_dir: Path = setting(Path("data"), parse=Path, metavar="DIR", shown_default="./data", help="where session data is written; created at startup")
    twilio_auth_token: str | None = setting(
        None, parse=non_empty, metavar="T",
        help="take phone calls through Twilio Media Streams (`POST /twilio/voice`, the number's voice webhook): the account's auth "
        "token, which checks each request's `X-Twilio-Signature`; prefer the environment variable",
    )
    record: bool = setting(
        False, parse=boolean, switch=True,
        help="keep each call as a stereo WAV beside its transcript (caller left, agent right, as the server heard and sent them): "
        "`GET /api/sessions/<id>/recording`",
    )
    otel_endpoint: str | None = setting(
        None, parse=http_url, metavar="URL",
        help="send OpenTelemetry traces (a span per call, turn and stage) by OTLP over HTTP to this collector (`/v1/traces` is added); "
        "the standard `OTEL_EXPORTER_OTLP_ENDPOINT` does the same",
    )

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise FieldError("cert", "give both --cert/--key or neither")


@dataclass(frozen=True)
class LoopbackConfig:
    """The loopback diagnostic profile: the caller's audio comes back after a fixed delay."""

    delay_ms: int = setting(1000, flag="--loopback-delay-ms", parse=non_negative_int, metavar="MS", help="loopback profile: echo delay")


@dataclass(frozen=True)
class Endpointing:
    """When the user's turn starts and ends: the speech detector, and the silences and judgement
    that commit a turn."""

    vad: str = setting("silero", choices=VAD_ENGINES, metavar="ENGINE", help="speech detector: `silero` (the ONNX model in the silero-vad package) or `webrtc`")
    webrtc_aggressiveness: int = setting(
        2, parse=lambda text: int(_choice(("0", "1", "2", "3"))(text)), metavar="N", help="webrtcvad strictness, 0 (lenient) to 3 (strict)"
    )
    type: str = setting(
        "semantic", flag="--turn-detection", choices=TURN_DETECTION, per_session=True, metavar="TYPE",
        help="`semantic`: an end-of-turn model and a text check decide; `vad`: commit after `--commit-ms`; "
        "`manual`: the client commits each turn (`input_audio_buffer.commit`)",
    )
    eagerness: str = setting(
        "medium", choices=EAGERNESS, per_session=True, metavar="E", help="semantic: how readily a pause ends the turn: `low`, `medium`, `high`"
    )
    threshold: float = setting(
        0.5, parse=float, limits=(0.05, 0.95), per_session=True, metavar="P", help="speech probability threshold (silence below P - 0.15)"
    )
    min_speech_ms: int = turn_ms(150, (20, 2000), "speech needed to start a user turn")
    prefix_padding_ms: int = turn_ms(300, (0, 2000), "audio kept from before the speech onset")
    commit_ms: int = turn_ms(750, (100, 10000), "vad: silence that ends the user's turn and plays the reply")
    min_commit_ms: int = turn_ms(250, (60, 5000), "semantic: silence before a turn judged complete is committed")
    max_commit_ms: int = turn_ms(2000, (200, 10000), "semantic: silence that commits a turn judged unfinished")


@dataclass(frozen=True)
class Speculation:
    """When a reply is prepared before the turn is committed: at a pause this long."""

    pause_ms: int = turn_ms(250, (60, 5000), "vad and manual: silence that starts a speculative reply")
    semantic_pause_ms: int = turn_ms(
        120, (60, 5000), "semantic: silence that starts a speculative reply (sooner, so that it is ready when a finished turn is committed)"
    )


@dataclass(frozen=True)
class Interruption:
    """Speech over the agent, and what the user heard of a reply."""

    bargein_min_speech_ms: int = turn_ms(200, (20, 5000), "speech needed to interrupt the agent")
    agent_pause_ms: int = turn_ms(40, (20, 5000), "voiced audio over the agent that pauses its audio until the sound proves a turn or not")
    backchannel_max_ms: int = turn_ms(
        1000, (0, 5000), "speech over the agent shorter than this, with no words or only a backchannel ('mm-hmm'), lets it resume; `0`: never"
    )
    merge_heard_ms: int = turn_ms(500, (0, 5000), "speech that starts before the user heard this much of a reply continues their utterance")
    client_buffer_ms: int = turn_ms(120, (0, 2000), "agent audio assumed still buffered at a client that reports no playback position")


@dataclass(frozen=True)
class Idle:
    """A user who says nothing after a reply: asked whether they are still there, then hung up on."""

    idle_timeout_ms: int = turn_ms(
        0, (0, 3_600_000), "silence after a reply has played that makes the agent ask whether the user is still there (`input_audio_buffer.timeout_triggered`); `0`: never"
    )
    idle_hangup_s: float = setting(
        0.0, parse=float, limits=(0.0, 3600.0), metavar="S", help="after that question, this much more silence ends the call (`session.closed` `idle_timeout`); `0`: never"
    )
    idle_prompt: str = setting("Are you still there?", parse=non_empty, metavar="TEXT", help="what the agent says when the user has been silent `idle_timeout_ms`")


@dataclass(frozen=True)
class TurnConfig:
    """Turn-taking, by concern. A session changes it with the flat field names of `session.update`'s
    `turn_detection` (all but the speech detector's own settings)."""

    endpointing: Endpointing = field(default_factory=Endpointing)
    speculation: Speculation = field(default_factory=Speculation)
    interruption: Interruption = field(default_factory=Interruption)
    idle: Idle = field(default_factory=Idle)

    def __post_init__(self) -> None:
        e, s = self.endpointing, self.speculation
        if e.commit_ms <= s.pause_ms:
            raise FieldError("commit_ms", "must be greater than pause_ms")
        if e.max_commit_ms <= max(s.semantic_pause_ms, e.min_commit_ms):
            raise FieldError("max_commit_ms", "must be greater than semantic_pause_ms and min_commit_ms")

    def updated(self, changes: dict[str, Any]) -> TurnConfig:
        """A copy with `changes` (flat names) applied, or ValueError naming the first bad field."""
        groups: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            item = SESSION_SETTINGS.get(key)
            if item is None:
                raise ValueError(f"unknown turn_detection field {key!r}; known: {sorted(SESSION_SETTINGS)}")
            try:
                groups.setdefault(item.path[-2], {})[key] = check_value(item.setting, value)
            except ValueError as exc:
                raise ValueError(f"turn_detection.{key} {exc}") from None
        try:
            return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **v) for g, v in groups.items()})
        except FieldError as exc:
            raise ValueError(f"turn_detection.{exc.field} {exc}") from None

    def with_session(self, session: dict[str, Any]) -> TurnConfig:
        """A copy changed by a `session.update`'s `session` object, or ValueError saying what is wrong."""
        unknown = set(session) - {"turn_detection"}
        if unknown:
            raise ValueError(f"unknown session fields {sorted(unknown)}; known: ['turn_detection']")
        changes = session.get("turn_detection", {})
        if not isinstance(changes, dict):
            raise ValueError("turn_detection must be an object")
        return self.updated(changes)

    def public(self) -> dict[str, Any]:
        """The flat view a client sees (`session.created`, `session.updated`)."""
        values = {"vad": self.endpointing.vad}
        for key, item in SESSION_SETTINGS.items():
            values[key] = getattr(getattr(self, item.path[-2]), key)
        return values


DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a spoken conversation. Answer in one or two short, "
    "plain sentences that sound natural when read aloud. No lists, no markdown, no emoji."
)


@dataclass(frozen=True)
class ModelConfig:
    """The embedded profile's models: which LM answers, how it is prompted, how hard they work."""

    asr: str = setting(
        "moonshine", choices=ASR_ENGINES, metavar="ENGINE",
        help="embedded profile's ASR: `moonshine` (Moonshine tiny-en), `whisper` (Whisper tiny.en) or `whisper-base` (Whisper base: hears better, costs more)"
    )
    lm: str = setting(
        "embedded", parse=lm_backend, metavar="BACKEND",
        help="embedded profile's LM: `embedded` (SmolLM2 in llama.cpp), `openai` (`--lm-url`) or `hf:<directory>` (transformers)",
    )
    lm_weights: str = setting(
        "q4_0", choices=LM_WEIGHTS, metavar="FORMAT",
        help="embedded LM's weights: `q4_0` (re-encoded once from the shipped Q4_1 and cached: the prompt ~1.8x faster), "
        "`q8_0` (the shipped values within 1/127 of a block's range, ~1.6x faster) or `shipped`",
    )
    lm_url: str = setting("http://127.0.0.1:8000/v1", parse=http_url, metavar="URL", help="base URL of the OpenAI-compatible API (`--lm openai`)")
    lm_model: str = setting("default", parse=non_empty, metavar="NAME", help="model name sent to that API")
    lm_api_key_env: str = setting(
        "OPENAI_API_KEY", parse=non_empty, metavar="VAR", help="environment variable that holds the API key (none sent if unset)"
    )
    system_prompt: str = setting(
        DEFAULT_SYSTEM_PROMPT, parse=non_empty, metavar="TEXT", shown_default="a short spoken-style prompt", help="the LM's system prompt"
    )
    max_new_tokens: int = setting(60, parse=positive_int, metavar="N", help="longest reply, in tokens")
    max_sentences: int = setting(2, parse=non_negative_int, metavar="N", help="a reply ends with its Nth sentence; `0` for no limit")
    temperature: float = setting(0.0, parse=temperature, metavar="T", help="sampling temperature, 0 to 2; 0 is greedy")
    history_tokens: int = setting(600, parse=positive_int, metavar="N", help="dialog history the LM sees (the system prompt always stays)")
    asr_partial_ms: int = setting(500, parse=positive_int, metavar="MS", help="new speech between two partial transcripts")
    lm_slots: int = setting(4, parse=positive_int, metavar="N", help="embedded LM: replies generated at once, in one batch")
    tools: str | None = setting(
        None, parse=module_name, metavar="MODULE", help="a Python module (importable name, e.g. `my_tools`) whose functions the agent may call (see Tools)"
    )
    builtin_tools: bool = setting(
        True, parse=boolean, metavar="BOOL", help="offer the built-in tools: `current_time`, `calculate`, `convert_units`"
    )
    tool_timeout_s: float = setting(
        5.0, parse=positive_float, metavar="S", help="a call that runs longer fails; the LM is told, the user hears an apology"
    )
    tool_filler_ms: int = setting(700, parse=non_negative_int, metavar="MS", help="a call still running after this gets \"One moment.\" spoken")
    tts_processes: int = setting(
        1, parse=positive_int, metavar="N", help="piper processes: pieces of this many calls are spoken at once"
    )
    threads: int = setting(
        factory=usable_cores, flag="--model-threads", parse=positive_int, metavar="N", shown_default="the machine's cores",
        help="CPU threads the models share: the LM all but one, ASR and speech one each",
    )

    @property
    def hf_path(self) -> Path | None:
        return Path(self.lm[3:]) if self.lm.startswith("hf:") else None


@dataclass(frozen=True)
class StepAudioConfig:
    """The stepaudio profile: where the weights are, where Step-Audio-Chat runs, which voice speaks."""

    model_path: Path | None = setting(
        None, parse=existing_dir, metavar="DIR",
        help="stepaudio profile: the directory holding `Step-Audio-Tokenizer/`, `Step-Audio-Chat/`, `Step-Audio-TTS-3B/`; "
        "stepaudio2 profile: a Step-Audio-2-mini directory (the model, its tokenizer, `token2wav/`)",
    )
    chat: str = setting(
        "local", flag="--stepaudio-chat", choices=("local", "served"), metavar="WHERE",
        help="`local`: Chat through transformers in this process; `served`: at `--lm-url` (`/v1/completions`, model `--lm-model`)",
    )
    device: str = setting(
        "auto", flag="--stepaudio-device", parse=non_empty, metavar="DEV", help="torch device of tokenizer and TTS-3B; `auto` takes `cuda` when there is one"
    )
    speaker: str = setting(
        "Tingting", flag="--stepaudio-speaker", parse=non_empty, metavar="ID", help="TTS-3B voice: an id in the speaker registry's `speakers_info.json`"
    )
    speakers: Path | None = setting(
        None, flag="--stepaudio-speakers", parse=existing_dir, metavar="DIR", shown_default="Step-Audio-TTS-3B/speakers",
        help="the speaker registry folder (`speakers_info.json` and `{id}_prompt.wav`); the published TTS-3B folder has none: "
        "it is the `speakers/` folder of StepFun's code repository",
    )
    clone: Path | None = setting(
        None, flag="--stepaudio-clone", parse=existing_file, metavar="FILE",
        help="voice cloning: a JSON file `{\"speaker\", \"prompt_text\", \"wav_path\"}` (wav path relative to the file); "
        "all speech then uses that voice (no registry needed)",
    )
    tts_prompts: Path | None = setting(
        None, flag="--stepaudio-tts-prompts", parse=existing_file, metavar="FILE", shown_default="built in",
        help="TTS-3B system prompts, JSON with any of `without_speaker`, `with_speaker` (`{speaker}` names the registry speaker), `rap`, `humming`",
    )
    dtype: str = setting(
        "auto", flag="--stepaudio-dtype", choices=("auto", "float32", "bfloat16"), metavar="T",
        help="dtype of TTS-3B and the flow: `auto` (bfloat16 on a GPU, as the reference runs them; float32 on the CPU), `float32`, `bfloat16`",
    )
    transcribe: bool = setting(
        True, flag="--stepaudio-transcribe", parse=boolean, metavar="BOOL",
        help="transcribe each user turn with Chat (Step-Audio's ASR prompt) beside the reply, for the text history; "
        "`false` keeps the audio tokens in the history instead",
    )


@dataclass(frozen=True)
class WorkerConfig:
    """One server among many behind one address: the registry it announces itself in, the address
    it is reached at, and how it stops."""

    registry: str | None = setting(
        None, parse=redis_url, metavar="URL",
        help="register this server as a worker in the Redis at URL (`redis://host:6379/0`): its address, load, whether it "
        "drains, and the sessions it holds, renewed every `--heartbeat-s`; without it, one process and no Redis",
    )
    advertise_url: str | None = setting(
        None, parse=http_url, metavar="URL", shown_default="http://HOST:PORT",
        help="the address the proxy and the other workers reach this worker at, as registered",
    )
    heartbeat_s: float = setting(
        2.0, parse=positive_float, metavar="S", help="how often a worker renews its record in the registry; it lapses after three missed",
    )
    drain_timeout_s: float = setting(
        0.0, parse=bounded(float, lambda v: v >= 0, "must be >= 0"), metavar="S",
        help="on SIGTERM: refuse new calls (HTTP 503 `draining`, `/healthz` 503, out of the registry) and let the calls "
        "up finish for at most S seconds, then close them and exit (0: close them at once); keep it under the grace "
        "period of what sends the SIGTERM (Docker's 10 s, Kubernetes' 30 s)",
    )


@dataclass(frozen=True)
class StepAudio2Config:
    """The stepaudio2 profile (Step-Audio 2 mini at `--model-path`, in this process or served by
    StepFun's vLLM): which voice speaks, on what device, how the model samples."""

    lm: str = setting(
        "local", flag="--stepaudio2-lm", choices=("local", "served"), metavar="WHERE",
        help="`local`: the model in this process; `served`: at `--lm-url` (`/chat/completions` of StepFun's vLLM fork, "
        "branch step-audio2-mini, model `--lm-model`); token2wav runs here either way",
    )
    voice: Path | None = setting(
        None, flag="--stepaudio2-voice", parse=existing_file, metavar="WAV", shown_default="MODEL/default_female.wav",
        help="the voice prompt token2wav speaks in; the published default voice is `assets/default_female.wav` of "
        "StepFun's Step-Audio2 repository (put it in the model directory, or name another wav)",
    )
    device: str = setting(
        "auto", flag="--stepaudio2-device", parse=non_empty, metavar="DEV", help="torch device of the model and token2wav; `auto` takes `cuda` when there is one"
    )
    max_new_tokens: int = setting(
        2048, flag="--stepaudio2-max-new-tokens", parse=positive_int, metavar="N",
        help="longest reply in the model's ids (text and ~25 audio tokens a second of speech, interleaved)",
    )
    temperature: float = setting(
        0.7, flag="--stepaudio2-temperature", parse=temperature, metavar="T",
        help="sampling temperature (top-p 0.9 and repetition penalty 1.05 as the reference's examples); 0 is greedy",
    )
    transcribe: bool = setting(
        True, flag="--stepaudio2-transcribe", parse=boolean, metavar="BOOL",
        help="transcribe each user turn with the model's ASR prompt beside the reply, for the client and the transcript "
        "(the model itself hears the audio either way)",
    )


@dataclass(frozen=True)
class LogConfig:
    """How the server logs."""

    json: bool = setting(False, flag="--log-json", parse=boolean, switch=True, help="JSON lines instead of readable console lines")
    level: str = setting("info", flag="--log-level", choices=("debug", "info", "warning", "error"), metavar="LEVEL", help="`debug`, `info`, `warning` or `error`")


@dataclass(frozen=True)
class AppConfig:
    """The root of the configuration tree."""

    profile: str = setting(
        "embedded", choices=PROFILES, metavar="NAME",
        help="model profile: `embedded` (offline models on the CPU), `loopback` (echo diagnostic), `stepaudio` or "
        "`stepaudio2` (`--model-path`)",
    )
    server: ServerConfig = field(default_factory=ServerConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    loopback: LoopbackConfig = field(default_factory=LoopbackConfig)
    stepaudio: StepAudioConfig = field(default_factory=StepAudioConfig)
    stepaudio2: StepAudio2Config = field(default_factory=StepAudio2Config)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.profile in ("stepaudio", "stepaudio2") and self.stepaudio.model_path is None:
            raise FieldError("model_path", f"the {self.profile} profile needs the directory holding its models")

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for the startup log, with credentials masked."""
        out = dataclasses.asdict(self)
        for server in out["server"]["ice_servers"]:
            if server.get("credential"):
                server["credential"] = "***"
        for secret in ("auth_token", "twilio_auth_token"):
            if out["server"][secret]:
                out["server"][secret] = "***"
        if out["worker"]["registry"]:  # redis://user:password@host: the password masked
            out["worker"]["registry"] = re.sub(r"(//[^/@]*:)[^/@]*@", r"\1***@", out["worker"]["registry"])
        return json.loads(json.dumps(out, default=str))


SETTINGS: tuple[Declared, ...] = tuple(declared(AppConfig))
SESSION_SETTINGS = {item.name: item for item in SETTINGS if item.setting.per_session}
_BY_NAME = {item.name: item for item in SETTINGS}


# ---- from the outside in ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_server.py",
        description=f"Real-time full-duplex voice agent server. Every flag also reads {ENV_PREFIX}<FLAG_NAME> from the environment.",
    )
    for item in SETTINGS:
        help_text = f"{item.setting.help} (default {item.default_text}) [env {item.env}]".replace("%", "%%")
        if item.setting.switch:
            parser.add_argument(item.flag, action="store_const", const="true", default=None, help=help_text)
        else:
            action = "append" if item.setting.repeat else "store"
            parser.add_argument(item.flag, action=action, default=None, metavar=item.setting.metavar, help=help_text)
    return parser


def _raw_values(argv: Sequence[str] | None, environ: dict[str, str]) -> dict[tuple[str, ...], Any]:
    """Each setting given on the command line or in the environment, converted and checked."""
    args = vars(build_parser().parse_args(argv))
    values: dict[tuple[str, ...], Any] = {}
    for item in SETTINGS:
        raw = args[item.dest]
        if raw is None and item.env in environ:
            text = environ[item.env]
            raw = [part for part in text.split(";") if part.strip()] if item.setting.repeat else text
        if raw is not None:
            values[item.path] = tuple(item.convert(r) for r in raw) if item.setting.repeat else item.convert(raw)
    return values


def _build(cls: type, values: dict[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = (*path, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, where)
        elif where in values:
            kwargs[f.name] = values[where]
    return cls(**kwargs)


def load_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> AppConfig:
    """Parse flags and environment into an AppConfig, or raise ConfigError naming the flag."""
    values = _raw_values(argv, dict(os.environ if environ is None else environ))
    try:
        return _build(AppConfig, values)
    except FieldError as exc:
        raise ConfigError(f"{_BY_NAME[exc.field].flag}: {exc}") from None


def markdown_table() -> str:
    """The README's configuration table, one row per setting."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for item in SETTINGS:
        name = item.flag if item.setting.switch else f"{item.flag} {item.setting.metavar}"
        default = item.default_text
        default = default if " " in default or default in ("none", "off") else f"`{default}`"
        rows.append(f"| `{name}` | {default} | {item.setting.help} |")
    return "\n".join(rows)
