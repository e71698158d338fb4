"""Sessions: what the transport hands to an agent, who owns each task, and the registry.

A Session owns every task started for one call (frame intake, pacing, watchdog, the agent) and
closes them all, in any state, when the call ends for any reason.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable, Coroutine, Iterator, Protocol, Sequence

import numpy as np
import structlog

from realtime.capacity import LoadMonitor
from realtime.echo import EchoCanceller
from realtime.events import ClientEvent, Error, EventError, Ping, Pong, ServerEvent, SessionClosed
from realtime.output import PacedOutput, PlaybackTracker
from realtime.recording import CallRecording
from realtime.wire import EventEncoder, parse_client_event
from runtime.tasks import TaskOwner

log = structlog.get_logger()

INPUT_QUEUE_FRAMES = 500  # 10 s of 20 ms frames: beyond that the agent is stuck and old audio is dropped


class Agent(Protocol):
    """One call's brain, built per session by the profile's factory."""

    async def run(self) -> None:
        """Consume input frames and produce output until cancelled."""

    def on_client_event(self, event: ClientEvent) -> None:
        """A checked client event (never `ping`)."""


@dataclass
class SessionIO:
    """The transport's side of a call, as the agent sees it."""

    session_id: str
    frames: asyncio.Queue[np.ndarray]  # 20 ms frames of 16 kHz mono int16
    output: PacedOutput
    emit: Callable[[ServerEvent], None]
    echo: EchoCanceller = field(default_factory=lambda: EchoCanceller("off"))  # on the input before the agent sees it
    defaults: dict[str, Any] = field(default_factory=dict)  # the `session.update` the transport's protocol starts a call with
    close: Callable[[str], None] = lambda reason: None  # ends the call (`reason`, as `session.closed` says it)
    playback: PlaybackTracker = field(init=False)  # how much of the current reply the client has played

    def __post_init__(self) -> None:
        self.playback = PlaybackTracker(self.output)


AgentFactory = Callable[[SessionIO], Agent]


class Session:
    """Owns one call: its tasks, its input queue (through its echo canceller, whose reference is
    what the paced output sends), its paced output and its event channel."""

    def __init__(
        self,
        transport: str,
        output: PacedOutput,
        send_text: Callable[[str], None],
        echo: EchoCanceller,
        defaults: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or "sess_" + uuid.uuid4().hex[:16]
        self.transport = transport
        self.started = time.monotonic()
        self.frames: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=INPUT_QUEUE_FRAMES)
        self.output = output
        self.echo = echo
        self.recording: CallRecording | None = None  # `--record`: the call's recording, while it is up
        output.on_sent = self._sent
        self.frames_received = 0
        self.frames_dropped = 0
        self.closed = asyncio.Event()  # set once everything is freed
        self._closing = False
        self.close_requested = asyncio.Event()
        self.close_reason: str | None = None
        self._send_text = send_text
        self._encoder = EventEncoder()
        self._tasks = TaskOwner(self.id, self._task_failed)
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        self._observers: list[Callable[[ServerEvent], None]] = []
        self.agent: Agent | None = None
        self.log = log.bind(session_id=self.id, transport=transport)
        echo.log = self.log
        self.remote_address: str | None = None  # the client's, for limits per address
        self.pending = False  # answered, but the peer has shown no life yet (WebRTC)
        self.pings = False  # the client sends `ping`s (and so promises one a second)
        self._io = SessionIO(self.id, self.frames, self.output, self.emit, self.echo, defaults or {}, self.request_close)

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return self._tasks.tasks

    def io(self) -> SessionIO:
        return self._io

    def start_agent(self, factory: AgentFactory) -> None:
        self.agent = factory(self.io())
        agent = self.spawn(self.agent.run(), "agent")
        agent.add_done_callback(self._agent_done)
        self.log.info("session.started", echo_cancel=self.echo.enabled)

    def watch(self, observer: Callable[[ServerEvent], None]) -> None:
        """Have `observer` see every event this session emits."""
        self._observers.append(observer)

    def emit(self, event: ServerEvent) -> None:
        if self._closing:
            return
        for observer in self._observers:
            observer(event)
        for text in self._encode(event):
            self._send_text(text)

    def _encode(self, event: ServerEvent) -> list[str]:
        """The messages that carry `event` on this transport (ours: its JSON, in pieces if large)."""
        return self._encoder.encode(event)

    def receive(self, message: str | bytes) -> None:
        """One client message, whatever the transport: parsed (`parse_message`), refused with an
        `error` event that changes nothing, a `ping` answered, any other event handed to the agent."""
        try:
            event = self.parse_message(message)
        except EventError as exc:
            self.reject(exc.code, exc.message)
            return
        if isinstance(event, Ping):
            self.pings = True
            self.emit(Pong(event.event_id))
        elif event is not None and self.agent is not None:
            self.agent.on_client_event(event)

    def parse_message(self, message: str | bytes) -> ClientEvent | None:
        """The event a message carries (None: one that needs nothing more); EventError if none."""
        return parse_client_event(message)

    def reject(self, code: str, message: str) -> None:
        self.log.info("event.rejected", code=code, reason=message)
        self.emit(Error(code, message))

    def _sent(self, frame: np.ndarray, sample_rate: int) -> None:
        self.echo.reference(frame, sample_rate)
        if self.recording is not None:
            self.recording.sent(frame, sample_rate)

    def push_frame(self, frame: np.ndarray) -> None:
        self.frames_received += 1
        if self.recording is not None:
            self.recording.heard(frame)
        if self.frames.full():
            self.frames.get_nowait()
            self.frames_dropped += 1
        self.frames.put_nowait(self.echo.clean(frame))

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Register transport teardown, run after every task is cancelled and awaited."""
        self._on_close.append(callback)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    def _task_failed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        if not self._closing:
            self.log.error("session.task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self.request_close("task_failed")

    def _agent_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None and not self._closing:
            self.request_close("agent_finished")

    def request_close(self, reason: str) -> None:
        """Ask for a close from code that cannot await it; the registry's supervisor carries it out."""
        if self.close_reason is None:
            self.close_reason = reason
        self.close_requested.set()

    async def close(self, reason: str) -> None:
        if self._closing:
            await self.closed.wait()
            return
        self.close_reason = self.close_reason or reason
        self.emit(SessionClosed(self.close_reason))  # the last event: the teardown lets it go out
        self._closing = True
        self.close_requested.set()
        await self._tasks.aclose(keep=asyncio.current_task())
        for callback in self._on_close:
            try:
                await callback()
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # A part cancelled from inside (aiohttp's shared drain future, cancelled with a
                # blocked writer): the teardown must still finish and the session leave the registry.
                self.log.warning("session.teardown_failed", error=repr(exc))
            except Exception as exc:  # teardown must go on whatever one part does
                self.log.warning("session.teardown_failed", error=repr(exc))
        self.output.flush()
        while not self.frames.empty():
            self.frames.get_nowait()
        self.log.info(
            "session.closed",
            reason=self.close_reason,
            duration_s=round(time.monotonic() - self.started, 3),
            frames_received=self.frames_received,
            frames_dropped=self.frames_dropped,
            frames_sent=self.output.frames_sent,
            audio_frames_sent=self.output.audio_frames_sent,
            late_frames=self.output.late_frames,
            worst_gap_ms=round(self.output.worst_gap_ms, 1),
        )
        self.closed.set()


class SessionWatcher(Protocol):
    """Told of every session the registry holds, and of each event it emits (the server's metrics)."""

    def opened(self, session: Session) -> None: ...

    def event(self, session: Session, event: ServerEvent) -> None: ...

    def closed(self, session: Session) -> None: ...


class SessionLimitReached(RuntimeError):
    """The server refuses a new call: `code` says why (`session_limit`, `at_capacity`: its
    load would go past `--max-load`, or `draining`: it is stopping)."""

    def __init__(self, message: str, code: str = "session_limit") -> None:
        super().__init__(message)
        self.code = code


class SessionRegistry:
    """All live sessions, bounded by max_sessions; a session leaves it when it closes. While it
    drains (the server is stopping) it takes no new one, and `empty` says when the last has gone."""

    def __init__(self, max_sessions: int, watchers: Sequence[SessionWatcher] = (), load: LoadMonitor | None = None) -> None:
        self.max_sessions = max_sessions
        self._watchers = list(watchers)
        self.load = load
        self.draining = False
        self.empty = asyncio.Event()
        self.empty.set()
        self._sessions: dict[str, Session] = {}
        self._supervisors = TaskOwner("registry")

    def watch(self, watcher: SessionWatcher) -> None:
        """`watcher` is told of the sessions opened from now on."""
        self._watchers.append(watcher)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def pending_from(self, address: str | None) -> int:
        """Sessions opened from `address` whose peer has not shown life yet."""
        return sum(1 for s in self._sessions.values() if s.pending and s.remote_address == address)

    def check_capacity(self) -> None:
        if self.draining:
            raise SessionLimitReached("draining: this server is stopping and takes no new call", "draining")
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(f"session limit of {self.max_sessions} reached")
        if self.load is not None and not self.load.admits(len(self._sessions)):
            raise SessionLimitReached(f"at capacity: one more call would load the server past {self.load.max_load}", "at_capacity")

    def add(self, session: Session) -> None:
        self.check_capacity()
        self._sessions[session.id] = session
        self.empty.clear()
        for watcher in self._watchers:
            watcher.opened(session)
            session.watch(partial(watcher.event, session))
        session.on_close(self._forget(session.id))
        self._supervisors.spawn(self._supervise(session), f"{session.id}:supervisor")

    async def _supervise(self, session: Session) -> None:
        await session.close_requested.wait()
        await session.close(session.close_reason or "closed")

    def _forget(self, session_id: str) -> Callable[[], Awaitable[None]]:
        async def forget() -> None:
            session = self._sessions.pop(session_id, None)
            for watcher in self._watchers if session is not None else ():
                watcher.closed(session)
            if not self._sessions:
                self.empty.set()

        return forget

    def health(self) -> dict[str, Any]:
        """What a load balancer and the workers' registry read: the calls up, the load measured and
        whether a new call would be taken now (`admitting` false: it gets 503)."""
        try:
            self.check_capacity()
            admitting = True
        except SessionLimitReached:
            admitting = False
        body: dict[str, Any] = {"sessions": len(self._sessions), "max_sessions": self.max_sessions, "admitting": admitting}
        if self.load is not None:
            body |= {"load": self.load.load(len(self._sessions)).as_dict(), "max_load": self.load.max_load, "capacity": self.load.capacity}
        return body | {"draining": self.draining}

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self._sessions.values())))
        await asyncio.gather(*self._supervisors.tasks, return_exceptions=True)
