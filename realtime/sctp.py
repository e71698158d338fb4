"""The data channel's SCTP, as browsers run it: their retransmission timers, and no call lost to a
message that is not UTF-8.

aiortc's SCTP keeps RFC 4960's timers: a lost message waits at least 1 s to be sent again, and the
association's first packet 3 s. Our events are sparse (a lost one rarely has followers to trigger
a fast retransmit), so on a lossy path that minimum became a data-channel stall per lost packet.
Chromium's SCTP (dcsctp, net/dcsctp/public/dcsctp_options.h) uses 500 ms initial, 220 ms minimum,
800 ms maximum; aiortc reads its module constants at each use, so `install()` sets them.

aiortc also decodes a text message with no guard: invalid UTF-8 raises inside its receive loop and
ends the association without a word. Such a message is handed on as binary instead, which the
session answers with an `error` event like any other message it cannot read.
"""

from __future__ import annotations

from typing import Any

import aiortc.rtcsctptransport as _sctp

RTO_INITIAL_S = 0.5
RTO_MIN_S = 0.22
RTO_MAX_S = 0.8

_receive = _sctp.RTCSctpTransport._data_channel_receive


async def _receive_any_text(self: Any, stream_id: int, pp_id: int, data: bytes) -> None:
    if pp_id == _sctp.WEBRTC_STRING:
        try:
            data.decode("utf8")
        except UnicodeDecodeError:
            pp_id = _sctp.WEBRTC_BINARY
    await _receive(self, stream_id, pp_id, data)


def install() -> None:
    """Make every aiortc data channel of this process retransmit on Chromium's timers and survive
    a text message that is not UTF-8."""
    _sctp.SCTP_RTO_INITIAL = RTO_INITIAL_S  # type: ignore[attr-defined]
    _sctp.SCTP_RTO_MIN = RTO_MIN_S  # type: ignore[attr-defined]
    _sctp.SCTP_RTO_MAX = RTO_MAX_S  # type: ignore[attr-defined]
    _sctp.RTCSctpTransport._data_channel_receive = _receive_any_text  # type: ignore[method-assign]
