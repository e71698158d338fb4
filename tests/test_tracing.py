"""OpenTelemetry traces: a span per call, turn and stage with the figures of `metrics.turn`, read
back from the SDK's in-memory exporter; and the same spans sent by OTLP over HTTP to a collector
(a stand-in on loopback that decodes the protobuf requests with OpenTelemetry's own messages)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from config import AppConfig, ServerConfig
from context.dialog import TranscriptStore
from realtime.server import build_app
from testkit.notifier import Notifier
from testkit.ws_peer import WsPeer
from tests.conftest import RunningServer
from tests.test_openai_realtime import Scripted

pytestmark = pytest.mark.unit

STAGES = {"endpoint": "endpoint_ms", "asr": "asr_ms", "llm": "lm_ttft_ms", "tts": "tts_first_audio_ms"}


async def _call(server: Any, agents: Scripted, questions: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    """A `/ws` call that asks `questions` aloud, one answered turn each; its session id and metrics."""
    peer = WsPeer(server.url)
    session_id = await peer.connect()
    session = server.registry.get(session_id)
    for question in questions:
        agents.tokenizer.transcript = question
        seen = sum(e["type"] == "metrics.turn" for e in peer.events)
        peer.speak(np.full(16000, 0.1, np.float32), 16000)
        await peer.changed.wait_for(lambda: sum(e["type"] == "metrics.turn" for e in peer.events) > seen, timeout=30)
    await peer.close()
    async with asyncio.timeout(10):
        await session.closed.wait()
    return session_id, [e for e in peer.events if e["type"] == "metrics.turn"]


async def test_each_call_turn_and_stage_is_a_span_with_the_figures_of_its_metrics(start_server):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    agents = Scripted()
    server = await start_server(factory=agents, echo_cancel="off", tracer_provider=provider)
    session_id, metrics = await _call(server, agents, ("What is the capital of France?", "What time is it?"))
    spans = exporter.get_finished_spans()
    (call,) = [s for s in spans if s.name == "call"]
    assert call.attributes["session.id"] == session_id and call.attributes["close.reason"] == "hangup"
    turns = {s.attributes["response.id"]: s for s in spans if s.name == "turn"}
    assert set(turns) == {m["response_id"] for m in metrics} and len(turns) == 2
    for figures in metrics:
        turn = turns[figures["response_id"]]
        assert turn.parent.span_id == call.context.span_id and turn.attributes["status"] == "completed"
        assert turn.attributes["server_v2v_ms"] == figures["server_v2v_ms"]
        stages = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == turn.context.span_id and s.name in STAGES}
        assert set(stages) == {name for name, key in STAGES.items() if key in figures}, figures
        for name, stage in stages.items():
            assert (stage.end_time - stage.start_time) / 1e6 == pytest.approx(figures[STAGES[name]], abs=1e-3)
        assert turn.start_time <= min(s.start_time for s in stages.values())
    (tool,) = [s for s in spans if s.name == "tool"]
    assert tool.attributes["tool.name"] == "current_time" and tool.parent.span_id == turns[metrics[1]["response_id"]].context.span_id


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def test_with_an_otlp_endpoint_the_spans_reach_the_collector(tmp_path):
    received: list[ExportTraceServiceRequest] = []
    arrived = Notifier()

    async def collect(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        arrived.notify()
        return web.Response(content_type="application/x-protobuf", body=b"")

    collector_app = web.Application()
    collector_app.router.add_post("/v1/traces", collect)
    collector, endpoint = await _serve(collector_app)
    try:
        agents = Scripted()
        server_config = ServerConfig(port=0, loopback_ice=True, data_dir=tmp_path / "data", max_load=None, echo_cancel="off", otel_endpoint=endpoint)
        app = build_app(AppConfig(server=server_config), agents, TranscriptStore(tmp_path / "data"))
        runner, url = await _serve(app)
        try:
            session_id, _ = await _call(RunningServer(url, app, AppConfig(server=server_config)), agents, ("What is the capital of France?",))
        finally:
            await runner.cleanup()  # the app's provider sends what it still holds as the app ends

        def spans() -> list[Any]:
            return [s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

        await arrived.wait_for(lambda: {"call", "turn", "endpoint"} <= {s.name for s in spans()}, timeout=10)
        (call,) = [s for s in spans() if s.name == "call"]
        assert {a.key: a.value.string_value for a in call.attributes}["session.id"] == session_id
        service = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
        assert service["service.name"] == "stepaudio-realtime"
    finally:
        await collector.cleanup()
