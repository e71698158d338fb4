"""A call over a bad network: the impairment relay itself, the receive path's jitter buffer and
concealing decoder, and a real call through 10 % loss, jitter and a 1280-byte MTU."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiortc.jitterbuffer import JitterFrame
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtp import RtpPacket
from av import AudioFrame

from bench.analysis import speech_end
from controller.loopback import MAX_JITTER_RESERVE_MS
from realtime.opus import PACKET_SAMPLES, AudioJitterBuffer, ConcealingOpusDecoder, FecOpusEncoder
from testkit.impair import Impairment, UdpRelay
from testkit.peer import ClientPeer
from tests.signals import speechlike

pytestmark = pytest.mark.unit


def test_impairment_spec():
    spec = Impairment.parse("loss=10%,delay=50ms,jitter=20ms,mtu=1280")
    assert spec == Impairment(loss=0.1, delay_s=0.05, jitter_s=0.02, mtu=1280)
    assert Impairment.parse(str(spec)) == spec
    assert Impairment.parse("loss=5%") == Impairment(loss=0.05)


@pytest.mark.parametrize("bad", ["loss=10", "delay=5s", "mtu=1280ms", "loss=120%", "drop=1%", "loss=%"])
def test_impairment_spec_rejects(bad):
    with pytest.raises(ValueError):
        Impairment.parse(bad)


def _description(port: int) -> str:
    return f"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host\r\n"


async def test_relay_drops_what_is_over_the_mtu_and_delays_the_rest():
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.put_nowait(data)

    server, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    client, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    relay = UdpRelay(Impairment(delay_s=0.05, mtu=1000))
    await relay.start()
    offer = relay.steer_offer(_description(client.get_extra_info("sockname")[1]))
    answer = relay.steer_answer(_description(server.get_extra_info("sockname")[1]))
    relay_port = int(answer.split()[-3])  # where the client now thinks the server is
    assert f" {client.get_extra_info('sockname')[1]} " not in offer
    try:
        sent_at = loop.time()
        client.sendto(b"x" * 1001, ("127.0.0.1", relay_port))
        client.sendto(b"y" * 1000, ("127.0.0.1", relay_port))
        assert await asyncio.wait_for(got.get(), 2) == b"y" * 1000
        assert loop.time() - sent_at >= 0.05
        assert relay.stats.to_server.too_big == 1 and relay.stats.to_server.sent == 1
        assert relay.stats.to_server.largest == 1001
    finally:
        relay.close()
        client.close()
        server.close()


def _packet(seq: int) -> RtpPacket:
    packet = RtpPacket(sequence_number=seq & 0xFFFF, timestamp=seq * PACKET_SAMPLES)
    packet._data = seq.to_bytes(4, "big")  # type: ignore[attr-defined]
    return packet


def _feed(buffer: AudioJitterBuffer, order: list[int]) -> list[int | None]:
    out = []
    for seq in order:
        _, frame = buffer.add(_packet(seq))
        out.append(None if frame is None else frame.timestamp // PACKET_SAMPLES)
    return out


def test_jitter_buffer_gives_up_on_a_lost_packet_after_the_look_ahead():
    # aiortc's own waited for 16 more packets here, then dropped some that had come.
    assert _feed(AudioJitterBuffer(prefetch=1), [0, 1, 3, 4, 5, 6]) == [None, 0, 1, 3, 4, 5]


def test_jitter_buffer_reorders_within_the_look_ahead_and_drops_later():
    assert _feed(AudioJitterBuffer(prefetch=2), [0, 2, 1, 3, 4, 6, 7, 5, 8]) == [None, 0, None, 1, 2, 3, 4, 5, 6]
    assert _feed(AudioJitterBuffer(prefetch=2), [0, 1, 2, 4, 5, 6, 3, 7]) == [None, None, 0, 1, 2, 4, None, 5]


def test_jitter_buffer_follows_a_jump_and_sequence_wrap():
    buffer = AudioJitterBuffer(prefetch=1)
    assert _feed(buffer, [65534, 65535, 65536, 65537]) == [None, 65534, 65535, 65536]
    assert _feed(buffer, [70000, 70001]) == [None, 70000]
    assert _feed(buffer, [100, 101]) == [None, 100]  # back, far: a restarted sender


def _encoded(encoder: OpusEncoder, seconds: float) -> list[tuple[bytes, int]]:
    pcm = (speechlike(seconds, 48000) * 20000).astype(np.int16)
    packets = []
    for start in range(0, len(pcm) - PACKET_SAMPLES + 1, PACKET_SAMPLES):
        frame = AudioFrame.from_ndarray(pcm[start : start + PACKET_SAMPLES].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, start
        payloads, timestamp = encoder.encode(frame)
        packets += [(payload, timestamp) for payload in payloads]
    return packets


def _rebuilt_snr_db(encoder: OpusEncoder, lost: set[int]) -> tuple[float, list[AudioFrame], list[AudioFrame]]:
    """The lost packets' signal-to-error ratio after concealment, against a loss-free decode."""
    packets = _encoded(encoder, 2.0)
    whole, concealed = ConcealingOpusDecoder(), ConcealingOpusDecoder()
    reference = [f for data, ts in packets for f in whole.decode(JitterFrame(data, ts))]
    frames = [f for n, (data, ts) in enumerate(packets) if n not in lost for f in concealed.decode(JitterFrame(data, ts))]
    assert concealed.concealed_samples == len([n for n in lost if n < len(packets) - 1]) * PACKET_SAMPLES
    level = np.sqrt(np.mean(np.concatenate([f.to_ndarray().ravel() for f in reference]).astype(np.float64) ** 2))
    signal = error = 0.0
    for n in lost:
        good = reference[n].to_ndarray().astype(np.float64).ravel()
        if np.sqrt(np.mean(good**2)) > 0.3 * level:  # where there is speech to rebuild
            signal += float(np.sum(good**2))
            error += float(np.sum((good - frames[n].to_ndarray().astype(np.float64).ravel()) ** 2))
    return 10 * np.log10(signal / error), frames, reference


def test_decoder_fills_lost_packets_and_rebuilds_them_from_fec():
    lost = set(range(7, 99, 10))
    with_fec, frames, reference = _rebuilt_snr_db(FecOpusEncoder(), lost)
    assert [f.pts for f in frames] == [f.pts for f in reference]  # every 20 ms is there, in order
    without_fec, _, _ = _rebuilt_snr_db(OpusEncoder(), lost)  # plain concealment only
    assert with_fec > 10, with_fec
    assert with_fec > without_fec + 5, (with_fec, without_fec)


async def test_a_call_through_loss_jitter_and_a_small_mtu(server):
    """10 % of datagrams lost each way, 50 +- 20 ms (so reordered), none over 1280 bytes: the call
    comes up, events and pongs flow, the echo comes back whole and without the delay a waiting
    jitter buffer adds (aiortc's: 300 ms a side after the first loss)."""
    network = Impairment.parse("loss=10%,delay=50ms,jitter=20ms,mtu=1280")
    peer = ClientPeer(server.url, ping_interval_s=0.2, impairment=network)
    try:
        session_id = await peer.connect(timeout=20)
        await peer.wait_event("session.created", timeout=10)
        await peer.changed.wait_for(lambda: peer.received, timeout=10)
        frames_before = len(peer.received)
        signal = speechlike(4.0, 48000)
        spoken_until = time.monotonic() + speech_end(signal, 48000)
        peer.speak(signal, 48000)
        await peer.changed.wait_for(lambda: time.monotonic() > spoken_until + 2.0, timeout=20)
        await peer.changed.wait_for(lambda: len(peer.ping_round_trips) >= 10, timeout=20)
        session = server.registry.get(session_id)
        stats = peer.relay.stats
        assert stats.to_server.lost > 0 and stats.to_client.lost > 0, stats  # the network really was bad
        assert stats.to_server.too_big == 0 and stats.to_client.too_big == 0, stats  # every datagram fits 1280 bytes
        # The echo's end: the loopback delay, its playout reserve at most, the network both ways, and
        # room for a loaded machine; a buffer that waits for lost packets was 400-600 ms later here.
        echo_ends = max(f.arrival for f in peer.received if np.sqrt(np.mean(f.pcm**2)) > 0.01)
        one_way_ms = (network.delay_s + network.jitter_s) * 1000
        bound_ms = server.config.loopback.delay_ms + MAX_JITTER_RESERVE_MS + 2 * one_way_ms + 300
        assert (echo_ends - spoken_until) * 1000 < bound_ms
        # Concealment keeps both ends' audio continuous: as many 20 ms frames as the time that passed.
        arrivals = [f.arrival for f in peer.received[frames_before:]]
        expected = (arrivals[-1] - arrivals[0]) * 50
        assert len(arrivals) >= 0.9 * expected, (len(arrivals), expected)
        assert session.frames_received >= 0.85 * session.output.frames_sent
    finally:
        await peer.close()


async def test_the_answer_asks_the_browser_for_fec(server):
    """A browser adds FEC to its Opus only for a peer whose description says it takes it."""
    peer = ClientPeer(server.url)
    try:
        await peer.connect()
        answer = peer.pc.remoteDescription.sdp
    finally:
        await peer.close()
    opus_pt = next(line.split()[0].split(":")[1] for line in answer.splitlines() if "opus/48000" in line)
    assert f"a=fmtp:{opus_pt} minptime=10;useinbandfec=1" in answer.splitlines(), answer
