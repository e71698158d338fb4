"""A bad network between one bench call and the server: a UDP relay on 127.0.0.1 that drops, delays,
jitters (and so reorders) and size-caps datagrams in both directions.

`tc netem` needs a kernel qdisc these machines lack, so the impairment lives in user space. The
relay stands in the middle of the ICE path: the offer's candidates are rewritten to its server-side
socket and the answer's to its client-side one, so each peer sees the relay as the other.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field

_SPEC = re.compile(r"^(loss|delay|jitter|mtu)=([\d.]+)(%|ms)?$")


@dataclass(frozen=True)
class Impairment:
    """What the relay does to each datagram, both ways: drop it with probability `loss`, delay it by
    `delay_s` +- `jitter_s` (uniform, each datagram on its own: they overtake one another), and drop
    it when its payload is over `mtu` bytes (a path that does not fragment)."""

    loss: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    mtu: int | None = None

    @classmethod
    def parse(cls, text: str) -> Impairment:
        """From `loss=10%,delay=50ms,jitter=20ms,mtu=1280` (any subset, any order)."""
        values: dict[str, float | int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _SPEC.match(part)
            if match is None:
                raise ValueError(f"not an impairment: {part!r} (loss=N%, delay=Nms, jitter=Nms, mtu=N)")
            name, number, unit = match.group(1), float(match.group(2)), match.group(3)
            expected = {"loss": "%", "delay": "ms", "jitter": "ms", "mtu": None}[name]
            if unit != expected:
                raise ValueError(f"{name} is given in {expected or 'bytes, no unit'}: {part!r}")
            if name == "loss":
                if number > 100:
                    raise ValueError(f"loss over 100%: {part!r}")
                values["loss"] = number / 100
            elif name == "mtu":
                values["mtu"] = int(number)
            else:
                values[f"{name}_s"] = number / 1000
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        parts = [f"loss={self.loss * 100:g}%", f"delay={self.delay_s * 1000:g}ms", f"jitter={self.jitter_s * 1000:g}ms"]
        return ",".join(parts + ([f"mtu={self.mtu}"] if self.mtu else []))


@dataclass
class Direction:
    """Counts of one direction's datagrams."""

    sent: int = 0
    lost: int = 0  # dropped at random
    too_big: int = 0  # dropped for the mtu
    largest: int = 0  # the largest payload seen, bytes

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "lost": self.lost, "too_big": self.too_big, "largest": self.largest}


@dataclass
class RelayStats:
    to_server: Direction = field(default_factory=Direction)
    to_client: Direction = field(default_factory=Direction)


Address = tuple[str, int]
_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ .*)$", re.IGNORECASE)


class _Side(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.receive = lambda data, addr: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.receive(data, addr)


class UdpRelay:
    """One call's path through an Impairment. Owns two sockets on 127.0.0.1: the client sends to
    `client_side`, the server to `server_side`; and the timers of the datagrams in flight."""

    def __init__(self, impairment: Impairment, seed: int | None = None) -> None:
        self.impairment = impairment
        self.stats = RelayStats()
        self._random = random.Random(seed)
        self._client_side = _Side()
        self._server_side = _Side()
        self._client: Address | None = None  # where the client really listens
        self._server: Address | None = None
        self._in_flight: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self._client_side, local_addr=("127.0.0.1", 0))
        await loop.create_datagram_endpoint(lambda: self._server_side, local_addr=("127.0.0.1", 0))
        self._client_side.receive = self._from_client
        self._server_side.receive = self._from_server

    def steer_offer(self, sdp: str) -> str:
        """The offer the server gets: the client's candidates replaced by the relay's server side."""
        self._client = self._first_candidate(sdp)
        return self._rewrite(sdp, self._address(self._server_side))

    def steer_answer(self, sdp: str) -> str:
        """The answer the client gets: the server's candidates replaced by the relay's client side."""
        self._server = self._first_candidate(sdp)
        return self._rewrite(sdp, self._address(self._client_side))

    def close(self) -> None:
        for handle in self._in_flight:
            handle.cancel()
        self._in_flight.clear()
        for side in (self._client_side, self._server_side):
            if side.transport is not None:
                side.transport.close()

    def _from_client(self, data: bytes, addr: Address) -> None:
        self._client = addr  # the source ICE really uses
        if self._server is not None:
            self._forward(data, self._server_side, self._server, self.stats.to_server)

    def _from_server(self, data: bytes, addr: Address) -> None:
        self._server = addr
        if self._client is not None:
            self._forward(data, self._client_side, self._client, self.stats.to_client)

    def _forward(self, data: bytes, out: _Side, to: Address, counts: Direction) -> None:
        counts.largest = max(counts.largest, len(data))
        imp = self.impairment
        if imp.mtu is not None and len(data) > imp.mtu:
            counts.too_big += 1
            return
        if self._random.random() < imp.loss:
            counts.lost += 1
            return
        counts.sent += 1
        delay = max(0.0, imp.delay_s + self._random.uniform(-imp.jitter_s, imp.jitter_s))
        if delay == 0:
            self._send(out, data, to, None)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def send() -> None:
            self._send(out, data, to, handle)

        handle = loop.call_later(delay, send)
        self._in_flight.add(handle)

    def _send(self, out: _Side, data: bytes, to: Address, handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            self._in_flight.discard(handle)
        if out.transport is not None and not out.transport.is_closing():
            out.transport.sendto(data, to)

    @staticmethod
    def _address(side: _Side) -> Address:
        assert side.transport is not None, "start() the relay first"
        host, port = side.transport.get_extra_info("sockname")[:2]
        return host, port

    @staticmethod
    def _first_candidate(sdp: str) -> Address:
        for line in sdp.splitlines():
            match = _CANDIDATE.match(line)
            if match and "." in match.group(2):
                return match.group(2), int(match.group(3))
        raise ValueError("the description has no IPv4 UDP candidate to relay to")

    @staticmethod
    def _rewrite(sdp: str, to: Address) -> str:
        """Each media section's first UDP candidate becomes one at `to`; the others go."""
        lines, seen = [], False
        for line in sdp.splitlines():
            if line.startswith("m="):
                seen = False
            elif line.startswith("a=candidate:"):
                match = _CANDIDATE.match(line)
                if match is None or seen:
                    continue
                seen = True
                line = f"{match.group(1)}{to[0]} {to[1]}{match.group(4)}"
            lines.append(line)
        return "\r\n".join(lines) + "\r\n"
