"""Data-channel retransmission timers as browsers set them.

aiortc's SCTP keeps RFC 4960's timers: a lost message waits at least 1 s to be sent again, and the
association's first packet 3 s. Our events are sparse (a lost one rarely has followers to trigger
a fast retransmit), so on a lossy path that minimum became a data-channel stall per lost packet.
Chromium's SCTP (dcsctp, net/dcsctp/public/dcsctp_options.h) uses 500 ms initial, 220 ms minimum,
800 ms maximum; aiortc reads its module constants at each use, so `install()` sets them.
"""

from __future__ import annotations

import aiortc.rtcsctptransport as _sctp

RTO_INITIAL_S = 0.5
RTO_MIN_S = 0.22
RTO_MAX_S = 0.8


def install() -> None:
    """Make every aiortc data channel of this process retransmit on Chromium's timers."""
    _sctp.SCTP_RTO_INITIAL = RTO_INITIAL_S  # type: ignore[attr-defined]
    _sctp.SCTP_RTO_MIN = RTO_MIN_S  # type: ignore[attr-defined]
    _sctp.SCTP_RTO_MAX = RTO_MAX_S  # type: ignore[attr-defined]
