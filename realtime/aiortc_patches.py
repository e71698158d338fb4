"""Every change this project makes to aiortc, in one place, installed once per process at startup:
Opus with in-band FEC and loss concealment (`opus.py`), the data channel's retransmission timers
and text guard (`sctp.py`), and each sent packet's audio level in numpy (`audio_level.py`). They
replace aiortc internals and were written against aiortc 1.16.0 (pinned in pyproject.toml);
another version is logged at install, since its internals may differ."""

from __future__ import annotations

from importlib.metadata import version

import structlog

from realtime import audio_level, opus, sctp

WRITTEN_FOR = "1.16.0"

_installed = False


def install() -> None:
    """Install the changes into this process's aiortc (a second call does nothing)."""
    global _installed
    if _installed:
        return
    found = version("aiortc")
    if found != WRITTEN_FOR:
        structlog.get_logger().warning("aiortc.untested_version", found=found, written_for=WRITTEN_FOR)
    opus.install()
    sctp.install()
    audio_level.install()
    _installed = True
