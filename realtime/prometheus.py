"""Prometheus metrics (`GET /metrics`): what a monitoring stack scrapes of a running server.

Every figure comes from what already passes through the transport (the server events a session
emits, the registry, the HTTP refusals) or is read at scrape time (the model workers' queues), so
the controller and the engines know nothing of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from realtime.events import MetricsTurn, ResponseDone, ServerEvent, SessionSummary
from runtime.workers import ModelWorker

if TYPE_CHECKING:
    from realtime.session import Session

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGES = ("endpoint_ms", "asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms")
STAGE_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# session.summary counter -> the total it adds to, with its help text
SUMMARY_COUNTERS = {
    "responses": "replies committed to",
    "bargeins": "replies the user interrupted",
    "speculative_starts": "replies started speculatively in a pause",
    "speculative_commits": "speculative replies the commit kept",
    "speculative_cancels": "speculative replies dropped because the user went on",
    "resumes": "speech over a reply that proved not to be a turn",
    "late_resumes": "speech soon after a commit that continued the utterance",
    "own_voice": "speech over a reply that was its own words come back (a speakerphone's echo)",
}


class ServerMetrics:
    """Owns one server's metrics registry (one per app, so several servers share a process); the
    session registry reports to it as a SessionWatcher."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._live = Gauge("voice_agent_sessions", "Live sessions", ["transport"], registry=r)
        self._opened = Counter("voice_agent_sessions_opened", "Sessions opened", ["transport"], registry=r)
        self._closed = Counter("voice_agent_sessions_closed", "Sessions closed, by reason", ["reason"], registry=r)
        self._turns = Counter("voice_agent_turns", "Replies ended, by status", ["status"], registry=r)
        self._counts = {
            name: Counter(f"voice_agent_{name}", help_text, registry=r) for name, help_text in SUMMARY_COUNTERS.items()
        }
        self._stages = Histogram(
            "voice_agent_stage_seconds", "Each stage of a turn, from its own start", ["stage"], buckets=STAGE_BUCKETS_S, registry=r
        )
        self._refused = Counter("voice_agent_refused", "HTTP requests refused, by error code", ["code"], registry=r)
        self._late_closed = 0  # late output frames of the sessions that have ended
        self._summaries: dict[str, dict[str, int]] = {}
        self._sessions: dict[str, Session] = {}
        r.register(_LiveCollector(self))

    # ---- what the registry and the server report ---------------------------------------------

    def opened(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._live.labels(session.transport).inc()
        self._opened.labels(session.transport).inc()

    def closed(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self._live.labels(session.transport).dec()
        self._closed.labels(session.close_reason or "closed").inc()
        self._late_closed += session.output.late_frames
        self._summaries.pop(session.id, None)

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()

    def event(self, session: Session, event: ServerEvent) -> None:
        """A server event a session emitted."""
        if isinstance(event, ResponseDone):
            self._turns.labels(event.status).inc()
        elif isinstance(event, MetricsTurn):
            for stage in STAGES:
                value = event.metrics.get(stage)
                if isinstance(value, (int, float)):
                    self._stages.labels(stage).observe(value / 1000)
        elif isinstance(event, SessionSummary):
            before = self._summaries.get(session.id, {})
            for name, counter in self._counts.items():
                grown = event.counters.get(name, 0) - before.get(name, 0)
                if grown > 0:
                    counter.inc(grown)
            self._summaries[session.id] = dict(event.counters)

    # ---- the scrape ---------------------------------------------------------------------------

    def late_frames(self) -> int:
        return self._late_closed + sum(s.output.late_frames for s in self._sessions.values())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Figures read at scrape time: late output frames, and the queue of each model worker."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "voice_agent_output_late_frames",
            "Output frames sent over 40 ms after the one before (the pacing fell behind)",
            value=self._metrics.late_frames(),
        )
        queues = GaugeMetricFamily(
            "voice_agent_model_queue_depth", "Calls submitted to a model worker and not finished", labels=["worker"]
        )
        for worker in ModelWorker.live():
            queues.add_metric([worker.name], worker.busy)
        yield queues
