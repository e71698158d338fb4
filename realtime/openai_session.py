"""An OpenAI Realtime (GA) session object: what a `/v1/realtime` client set, echoed back whole in
`session.created` / `session.updated`, and what of it our Controller is told (`session.update`).

What the GA session says and what this server does with it:
- `audio.input.turn_detection`: `server_vad` (the GA default) is our `vad`, with
  `silence_duration_ms` as `commit_ms` (any value: under our 100 ms floor it commits at 100 ms) and
  a speculative reply prepared at a shorter pause; `threshold` and `prefix_padding_ms` are clamped
  to what our detector takes; `semantic_vad` is our `semantic`; `null` our `manual`.
  `create_response`, `interrupt_response` and `idle_timeout_ms` (the agent asks whether the user
  is still there) are honoured.
- `instructions`: the session's system prompt.
- `output_modalities`: `["audio"]` or `["text"]` (text only: no speech is synthesized).
- `audio.input.format` / `audio.output.format`: only `audio/pcm` at 24 kHz.
- `audio.output.voice`, `audio.input.transcription`: echoed as set; every voice is the profile's
  one voice, and the profile's own ASR transcribes.
- `tools`: the server's own functions run server-side; functions a client declares are not called
  (echoed as none). `noise_reduction` is not applied (echoed null).
"""

from __future__ import annotations

import copy
from typing import Any

from realtime.events import EventError

RATE = 24000
AUDIO_FORMAT = {"type": "audio/pcm", "rate": RATE}
SERVER_VAD = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
SEMANTIC_VAD = {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
# Our detector's and endpointer's limits (config.Endpointing / Speculation): GA values beyond are clamped.
THRESHOLD = (0.05, 0.95)
PREFIX_PADDING_MS = (0, 2000)
COMMIT_MS = (100, 10000)
PAUSE_MS = (60, 250)  # the speculative reply starts this long into the silence, before the commit
IDLE_TIMEOUT_MS = (0, 3_600_000)  # ours (config.Idle)
EAGERNESS = ("low", "medium", "high", "auto")


def _clamp(value: Any, limits: tuple[float, float], name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError("invalid_value", f"turn_detection.{name} must be a number")
    return min(max(value, limits[0]), limits[1])


def turn_detection_to_ours(detection: Any) -> dict[str, Any]:
    """A GA `turn_detection` object (the whole of it, defaults filled) as our `session.update`
    turn_detection, or EventError."""
    if detection is None:
        return {"type": "manual"}
    if not isinstance(detection, dict):
        raise EventError("invalid_value", "turn_detection must be an object or null")
    kind = detection.get("type")
    if kind == "server_vad":
        commit_ms = round(_clamp(detection["silence_duration_ms"], COMMIT_MS, "silence_duration_ms"))
        idle_ms = detection.get("idle_timeout_ms")
        return {
            "type": "vad",
            "threshold": _clamp(detection["threshold"], THRESHOLD, "threshold"),
            "prefix_padding_ms": round(_clamp(detection["prefix_padding_ms"], PREFIX_PADDING_MS, "prefix_padding_ms")),
            "commit_ms": commit_ms,
            "pause_ms": round(min(max(commit_ms - 50, PAUSE_MS[0]), PAUSE_MS[1])),
            "idle_timeout_ms": 0 if idle_ms is None else round(_clamp(idle_ms, IDLE_TIMEOUT_MS, "idle_timeout_ms")),
        }
    if kind == "semantic_vad":
        eagerness = detection.get("eagerness", "auto")
        if eagerness not in EAGERNESS:
            raise EventError("invalid_value", f"turn_detection.eagerness must be one of {list(EAGERNESS)}")
        return {"type": "semantic", "eagerness": "medium" if eagerness == "auto" else eagerness}
    raise EventError("invalid_value", f"unknown turn_detection type {kind!r}: server_vad or semantic_vad")


class RealtimeSession:
    """Owns one connection's GA session object: the settings as the client set them (with GA's
    defaults), the update waiting for the Controller's answer, and what the Controller is told."""

    def __init__(self, model: str) -> None:
        self.settings: dict[str, Any] = {
            "type": "realtime",
            "model": model,
            "output_modalities": ["audio"],
            "instructions": None,
            "audio": {
                "input": {"format": AUDIO_FORMAT, "transcription": None, "noise_reduction": None, "turn_detection": dict(SERVER_VAD)},
                "output": {"format": AUDIO_FORMAT, "voice": "default", "speed": 1.0},
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "prompt": None,
            "include": None,
            "truncation": "auto",
        }
        self._pending: dict[str, Any] | None = None

    @property
    def text_only(self) -> bool:
        return self.settings["output_modalities"] == ["text"]

    def initial(self) -> dict[str, Any]:
        """What our Controller starts the session with: GA's defaults (server_vad, not our semantic)."""
        return {"turn_detection": turn_detection_to_ours(SERVER_VAD)}

    def echo(self, ours: dict[str, Any]) -> dict[str, Any]:
        """The session as `session.created` / `.updated` carry it; `ours`: the Controller's view."""
        session = copy.deepcopy(self.settings)
        session["instructions"] = ours.get("instructions", session["instructions"])
        return {"object": "realtime.session", "id": ours.get("id"), **session}

    def update(self, session: Any) -> dict[str, Any]:
        """A client's GA `session` object: checked, kept until the Controller takes it (`applied`),
        and returned as our `session.update`'s session; EventError if it cannot be taken."""
        if not isinstance(session, dict):
            raise EventError("invalid_value", "session.update needs a 'session' object")
        settings = copy.deepcopy(self.settings)
        ours: dict[str, Any] = {}
        modalities = session.get("output_modalities")
        if modalities is not None:
            if modalities not in (["audio"], ["text"]):
                raise EventError("invalid_value", "output_modalities must be ['audio'] or ['text']")
            settings["output_modalities"] = modalities
            ours["text_only"] = modalities == ["text"]  # then no speech is synthesized at all
        if "instructions" in session:
            if not isinstance(session["instructions"], str):
                raise EventError("invalid_value", "instructions must be a string")
            settings["instructions"] = ours["instructions"] = session["instructions"]
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            raise EventError("invalid_value", "audio must be an object")
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        if not isinstance(audio_in, dict) or not isinstance(audio_out, dict):
            raise EventError("invalid_value", "audio.input and audio.output must be objects")
        for where, part in (("input", audio_in), ("output", audio_out)):
            fmt = part.get("format")
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm" or fmt.get("rate", RATE) != RATE):
                raise EventError("unsupported", f"audio.{where}.format: only audio/pcm at {RATE} Hz")
        if "transcription" in audio_in:
            settings["audio"]["input"]["transcription"] = audio_in["transcription"]
        for key in ("voice", "speed"):
            if key in audio_out:
                settings["audio"]["output"][key] = audio_out[key]
        if "turn_detection" in audio_in:
            detection = self._detection(audio_in["turn_detection"])
            ours["turn_detection"] = turn_detection_to_ours(detection)
            if detection is not None:
                ours["create_response"] = detection["create_response"]
                ours["interrupt_response"] = detection["interrupt_response"]
            settings["audio"]["input"]["turn_detection"] = detection
        self._pending = settings
        return ours

    def _detection(self, given: Any) -> dict[str, Any] | None:
        """A GA turn_detection as the session will echo it: GA's defaults for what is not given."""
        if given is None:
            return None
        if not isinstance(given, dict):
            raise EventError("invalid_value", "turn_detection must be an object or null")
        kind = given.get("type", "server_vad")
        if kind == "server_vad":
            defaults = SERVER_VAD
        elif kind == "semantic_vad":
            defaults = SEMANTIC_VAD
        else:
            raise EventError("invalid_value", f"unknown turn_detection type {kind!r}: server_vad or semantic_vad")
        detection = {key: given.get(key, value) for key, value in defaults.items()}
        for flag in ("create_response", "interrupt_response"):
            if not isinstance(detection[flag], bool):
                raise EventError("invalid_value", f"turn_detection.{flag} must be true or false")
        return detection

    def applied(self) -> None:
        """The Controller took the update: it is the session now."""
        if self._pending is not None:
            self.settings, self._pending = self._pending, None
