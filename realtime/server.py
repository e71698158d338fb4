"""The HTTP server: the web client, signaling (`POST /api/offer`), `/ws`, health and client config.

Every refusal is JSON `{"error": {"code", "message"}}` with a fitting status.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Callable, Protocol

import structlog
from aiohttp import web
from aiortc import RTCSessionDescription
from opentelemetry.sdk.trace import TracerProvider

from config import AppConfig, ServerConfig
from realtime import aiortc_patches
from realtime.access import PROTECTED_PREFIXES, OfferRate, origin_allowed, token_matches
from realtime.capacity import RETRY_AFTER_S, LoadMonitor
from realtime.openai_realtime import serve_openai_realtime
from realtime.prometheus import CONTENT_TYPE, ServerMetrics
from realtime.session import AgentFactory, SessionLimitReached, SessionRegistry, SessionWatcher
from realtime.recording import Recordings, recording_path
from realtime.tracing import CallTraces, otlp_provider
from realtime.twilio import MEDIA_PATH, TwilioRoutes
from realtime.session_homes import HomeUnreachable
from realtime.worker import Shared, announce
from realtime.webrtc import TooManyPendingOffers, open_webrtc_session, use_loopback_ice_only
from realtime.wire import MAX_MESSAGE_BYTES
from realtime.ws import serve_websocket
from runtime.tasks import TaskOwner

log = structlog.get_logger()

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PING_INTERVAL_MS = 1000

class TranscriptSource(Protocol):
    def read(self, session_id: str) -> list[dict[str, Any]] | None:
        """A session's stored turns, or None if there is no such session."""

    def mirror(self, copy: Callable[[str, str], None]) -> None:
        """Each record written from now on is also given to `copy` (session id, JSON line)."""


REGISTRY = web.AppKey("registry", SessionRegistry)
METRICS = web.AppKey("metrics", ServerMetrics)
ERROR_CODE = web.ResponseKey("error_code", str)  # a refusal's code, kept on its response for the metrics
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


def json_error(status: int, code: str, message: str, retry_after_s: int | None = None) -> web.Response:
    log.info("http.refused", status=status, code=code, reason=message)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    response = web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)
    response[ERROR_CODE] = code
    return response


def count_refusals(metrics: ServerMetrics) -> Any:
    """The outermost middleware: each refusal, whichever layer made it, counted by its code."""

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        code = response.get(ERROR_CODE)
        if code is not None:
            metrics.refused(code)
        return response

    return count


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, "body_too_large", f"request body exceeds {request.app[MAX_BODY_BYTES]} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


def access_control(config: ServerConfig) -> Any:
    """The middleware that guards the API: the token when one is set, the browser's origin, and
    the offer rate of each address."""
    offers = OfferRate(config.offers_per_minute)

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIXES):
            if config.auth_token and not token_matches(request, config.auth_token):
                return json_error(401, "unauthorized", "this server needs its token: 'Authorization: Bearer <token>'")
            if not origin_allowed(request, config.allowed_origins):
                return json_error(403, "forbidden_origin", f"pages at {request.headers['Origin']} may not use this server")
            if request.path == "/api/offer" and not offers.allow(request.remote or ""):
                return json_error(429, "too_many_offers", f"at most {offers.per_minute} offers a minute from one address")
        return await handler(request)

    return check


class Routes:
    """The request handlers of one app, bound to its configuration, registry and agent factory."""

    def __init__(
        self,
        config: AppConfig,
        registry: SessionRegistry,
        factory: AgentFactory,
        transcripts: TranscriptSource,
        shared: Shared | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.factory = factory
        self.transcripts = transcripts
        self.shared = shared  # with --registry: what the other workers hold

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        # tasks: every asyncio task of the server, for leak checks (bench.soak); load: what a load
        # balancer reads to send a call elsewhere (`admitting` false: a call now gets 503).
        # A draining server answers 503, so that a proxy's health check takes it out of rotation.
        body = {"status": "draining" if self.registry.draining else "ok", "profile": self.config.profile}
        body |= self.registry.health() | {"tasks": len(asyncio.all_tasks())}
        return web.json_response(body, status=503 if self.registry.draining else 200)

    async def client_config(self, request: web.Request) -> web.Response:
        server = self.config.server
        return web.json_response(
            {
                "profile": self.config.profile,
                "ice_servers": [s.to_json() for s in server.ice_servers],
                "loopback_ice": server.loopback_ice,
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "ping_interval_ms": PING_INTERVAL_MS,
            }
        )

    async def offer(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return json_error(415, "unsupported_media_type", "send the offer as application/json")
        try:
            body = await request.json()
        except (ValueError, RecursionError) as exc:
            return json_error(400, "invalid_json", f"body is not valid JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            return json_error(400, "invalid_offer", "body must be {sdp: string, type: 'offer'}")
        if "m=audio" not in body["sdp"]:
            return json_error(400, "invalid_sdp", "the SDP offer has no audio section")
        client_cancels = body.get("client_echo_cancellation")
        if client_cancels is not None and not isinstance(client_cancels, bool):
            return json_error(400, "invalid_offer", "client_echo_cancellation must be true or false")
        try:
            session, answer = await open_webrtc_session(
                RTCSessionDescription(sdp=body["sdp"], type="offer"),
                self.config.server,
                self.registry,
                self.factory,
                request.remote,
                client_cancels,
            )
        except SessionLimitReached as exc:
            return json_error(503, exc.code, str(exc), RETRY_AFTER_S)
        except TooManyPendingOffers as exc:
            return json_error(429, "too_many_pending_offers", str(exc))
        except Exception as exc:  # aiortc raises assorted errors for SDP it cannot use
            return json_error(400, "invalid_sdp", f"cannot use this SDP offer: {exc}")
        # The header: for a proxy in front of many workers, which remembers where the session lives.
        return web.json_response(
            {"sdp": answer.sdp, "type": answer.type, "session_id": session.id}, headers={"X-Session-Id": session.id}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def transcript(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        turns = self.transcripts.read(session_id)
        if turns is None and self.shared is not None:  # a session another worker held
            turns = await self.shared.transcripts.read(session_id)
        if turns is None:
            return json_error(404, "not_found", f"no transcript for session {session_id!r}")
        return web.json_response({"session_id": session_id, "turns": turns})

    async def recording(self, request: web.Request) -> web.StreamResponse:
        """A call's recording, once the call has ended (while it is up, its WAV has no length yet)."""
        session_id = request.match_info["session_id"]
        path = recording_path(self.config.server.data_dir, session_id)
        if (path is None or not path.is_file()) and self.shared is not None:  # held by another worker?
            try:
                answer = await self.shared.homes.pass_on(request, session_id)
            except HomeUnreachable as exc:
                return json_error(502, "worker_unreachable", str(exc))
            if answer is not None:
                return answer
        if path is None or not path.is_file():
            return json_error(404, "not_found", f"no recording for session {session_id!r} (calls are recorded with --record)")
        if self.registry.get(session_id) is not None:
            return json_error(409, "call_in_progress", f"session {session_id!r} is still up: its recording is ready when it ends")
        return web.FileResponse(path, headers={"Content-Type": "audio/wav", "Content-Disposition": f'attachment; filename="{session_id}.wav"'})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        return await self._upgrade(request, serve_websocket)

    async def openai_realtime(self, request: web.Request) -> web.StreamResponse:
        return await self._upgrade(request, serve_openai_realtime)

    async def _upgrade(self, request: web.Request, serve: Any) -> web.StreamResponse:
        """A WebSocket transport, or a plain 503 before the upgrade when the server is full."""
        try:
            self.registry.check_capacity()
        except SessionLimitReached as exc:
            return json_error(503, exc.code, str(exc), RETRY_AFTER_S)
        return await serve(request, self.config.server, self.registry, self.factory)


def build_app(
    config: AppConfig,
    factory: AgentFactory,
    transcripts: TranscriptSource,
    call_share: float = 0.0,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    """The app; `call_share` is the share of the machine one call's turn takes (the profile's, timed
    at start-up; 0 for a profile without models): what `--max-load` counts each call for. Calls are
    traced to `tracer_provider`, or by OTLP when `--otel-endpoint` (or the standard variable) says
    where (that provider is the app's, shut down with it)."""
    aiortc_patches.install()
    if config.server.loopback_ice:
        use_loopback_ice_only()
    metrics = ServerMetrics()
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[count_refusals(metrics), errors_as_json, access_control(config.server)],
    )
    app[MAX_BODY_BYTES] = config.server.max_body_bytes
    monitor = LoadMonitor(config.server.max_load, call_share)
    owned_provider = None if tracer_provider is not None else otlp_provider(config.server.otel_endpoint)
    provider = tracer_provider or owned_provider
    registry = SessionRegistry(config.server.max_sessions, _watchers(config, metrics, provider), monitor)
    app[REGISTRY], app[METRICS] = registry, metrics
    shared = announce(app, config, registry, transcripts)
    routes = Routes(config, registry, factory, transcripts, shared)
    app.router.add_get("/", routes.index)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/api/config", routes.client_config)
    app.router.add_post("/api/offer", routes.offer)
    app.router.add_get("/ws", routes.websocket)
    app.router.add_get("/v1/realtime", routes.openai_realtime)
    app.router.add_get("/api/sessions/{session_id}/transcript", routes.transcript)
    app.router.add_get("/api/sessions/{session_id}/recording", routes.recording)
    twilio = TwilioRoutes(config.server, registry, factory)
    app.router.add_post("/twilio/voice", twilio.voice)
    app.router.add_get(MEDIA_PATH, twilio.media)
    app.router.add_static("/web/", WEB_DIR)

    async def close_sessions(app: web.Application) -> None:
        await registry.close_all("server_shutdown")

    app.on_shutdown.append(close_sessions)

    async def measure_load(app: web.Application):
        tasks = TaskOwner("server")
        tasks.spawn(monitor.run(), "load-monitor")
        yield
        await tasks.aclose()

    app.cleanup_ctx.append(measure_load)

    async def send_traces(app: web.Application) -> None:
        if owned_provider is not None:  # in a thread: the exporter's last sends may go to this very loop
            await asyncio.to_thread(owned_provider.shutdown)

    app.on_cleanup.append(send_traces)
    return app


def _watchers(config: AppConfig, metrics: ServerMetrics, tracer_provider: TracerProvider | None) -> list[SessionWatcher]:
    """What sees every call: the metrics always; traces and recordings when asked for."""
    watchers: list[SessionWatcher] = [metrics]
    if tracer_provider is not None:
        watchers.append(CallTraces(tracer_provider))
    if config.server.record:
        watchers.append(Recordings(config.server.data_dir))
    return watchers


def ssl_context(config: AppConfig) -> ssl.SSLContext | None:
    server = config.server
    if server.cert is None or server.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.cert, server.key)
    return context
