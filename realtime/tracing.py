"""OpenTelemetry traces: a span per call, per turn (each committed reply) and per stage of a turn
(endpoint, asr, llm, tts, each tool call), built from the events a session emits, as `/metrics`
is, so that the controller and the engines know nothing of it.

A turn's stage spans carry the figures of its `metrics.turn` (`duration_ms`, the same numbers):
`endpoint` runs from the end of the user's voice to the commit; `asr`, `llm` (the LM's first token)
and `tts` (the first audio) are set back to back, ending where the first audio left the server
(`server_v2v_ms` after the voice ended). A speculative reply did some of that work before the
commit, so their places are where the critical path would put them; their lengths are measured.
A tool call's span runs from the call's announcement to its output.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from realtime.events import (
    ConversationItemCreated,
    FunctionCallArgumentsDone,
    MetricsTurn,
    ResponseAudioStarted,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
)

if TYPE_CHECKING:
    from realtime.session import Session

SERVICE = "stepaudio-realtime"
STANDARD_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
CHAIN = (("asr", "asr_ms"), ("llm", "lm_ttft_ms"), ("tts", "tts_first_audio_ms"))  # in order, ending at the first audio


def otlp_provider(endpoint: str | None) -> TracerProvider | None:
    """A tracer provider that sends spans to `endpoint` (or the standard environment variable's) by
    OTLP over HTTP; None when neither is set. Its owner shuts it down (which sends what is left)."""
    if endpoint is None and not os.environ.get(STANDARD_ENDPOINT):
        return None
    exporter = OTLPSpanExporter(endpoint=None if endpoint is None else endpoint.rstrip("/") + "/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


ENDED_TURNS_KEPT = 8  # a tool's output may come after its turn ended (an interrupted reply)


def _ns(ms: float) -> int:
    return round(ms * 1_000_000)


@dataclass
class _Turn:
    """A turn until its metrics come (its span is made then, when its start is known)."""

    created_ns: int
    status: str = ""
    audio_ns: int | None = None
    tools: list[tuple[str, str, int, int]] = field(default_factory=list)  # name, call id, start, end


@dataclass
class _Call:
    span: trace.Span
    turns: dict[str, _Turn] = field(default_factory=dict)
    ended: dict[str, Any] = field(default_factory=dict)  # response id -> the ended turn's span context
    tools: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # call id -> response id, name, start


class CallTraces:
    """Owns what the live calls' traces still wait for: each call's span, its turns until their
    metrics come, its tool calls until their outputs come. A SessionWatcher."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer(__name__)
        self._calls: dict[str, _Call] = {}

    def opened(self, session: Session) -> None:
        span = self._tracer.start_span("call", attributes={"session.id": session.id, "transport": session.transport})
        self._calls[session.id] = _Call(span)

    def closed(self, session: Session) -> None:
        call = self._calls.pop(session.id, None)
        if call is None:
            return
        now = time.time_ns()
        for response_id, name, start in call.tools.values():  # never answered: they end with the call
            turn = call.turns.get(response_id)
            if turn is not None:
                turn.tools.append((name, "", start, now))
        for response_id, turn in call.turns.items():
            self._end_turn(call, response_id, turn, {"status": turn.status or "unfinished"}, now)
        call.span.set_attribute("close.reason", session.close_reason or "closed")
        call.span.end(end_time=now)

    def event(self, session: Session, event: ServerEvent) -> None:
        call = self._calls.get(session.id)
        if call is None:
            return
        now = time.time_ns()
        match event:
            case ResponseCreated():
                call.turns[event.response_id] = _Turn(now)
            case ResponseAudioStarted() if (turn := call.turns.get(event.response_id)) is not None:
                turn.audio_ns = now
            case ResponseDone() if (turn := call.turns.get(event.response_id)) is not None:
                turn.status = event.status
            case MetricsTurn() if (turn := call.turns.pop(event.response_id, None)) is not None:
                attributes = {"status": turn.status, "speculative": event.speculative, **event.metrics}
                self._end_turn(call, event.response_id, turn, attributes, now)
            case FunctionCallArgumentsDone():
                call.tools[event.call_id] = (event.response_id, event.name, now)
            case ConversationItemCreated() if (tool := call.tools.pop(str(event.item.get("call_id")), None)) is not None:
                response_id, name, start = tool
                if (turn := call.turns.get(response_id)) is not None:
                    turn.tools.append((name, str(event.item["call_id"]), start, now))
                elif (context := call.ended.get(response_id)) is not None:
                    self._span(context, "tool", start, now, {"tool.name": name, "tool.call_id": str(event.item["call_id"])})

    def _end_turn(self, call: _Call, response_id: str, turn: _Turn, attributes: dict[str, Any], now: int) -> None:
        """The turn's span, from the end of the user's voice, with its figures and its stages' spans."""
        metrics = {k: v for k, v in attributes.items() if k.endswith("_ms")}
        voice_end = turn.created_ns - _ns(metrics.get("endpoint_ms", 0.0))
        span = self._tracer.start_span(
            "turn", trace.set_span_in_context(call.span), attributes={"response.id": response_id, **attributes}, start_time=voice_end
        )
        context = trace.set_span_in_context(span)
        if "endpoint_ms" in metrics:
            self._stage(context, "endpoint", "endpoint_ms", metrics["endpoint_ms"], voice_end)
        end = voice_end + _ns(metrics["server_v2v_ms"]) if "server_v2v_ms" in metrics else turn.audio_ns
        placed = []
        for name, key in reversed(CHAIN):
            if end is not None and key in metrics:
                end -= _ns(metrics[key])
                placed.append((name, key, end))
        for name, key, start in reversed(placed):
            self._stage(context, name, key, metrics[key], start)
        for name, call_id, start, stop in turn.tools:
            self._span(context, "tool", start, stop, {"tool.name": name, "tool.call_id": call_id})
        span.end(end_time=now)
        call.ended[response_id] = context
        while len(call.ended) > ENDED_TURNS_KEPT:
            call.ended.pop(next(iter(call.ended)))

    def _stage(self, context: Any, name: str, key: str, duration_ms: float, start_ns: int) -> None:
        self._span(context, name, start_ns, start_ns + _ns(duration_ms), {"duration_ms": duration_ms, "metric": key})

    def _span(self, context: Any, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
        self._tracer.start_span(name, context, attributes=attributes, start_time=start_ns).end(end_time=end_ns)
