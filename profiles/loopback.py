"""The loopback profile: no models; each session's agent echoes the caller after a delay."""

from __future__ import annotations

from config import LoopbackConfig
from controller.loopback import LoopbackAgent
from realtime.session import AgentFactory


def loopback(config: LoopbackConfig) -> AgentFactory:
    return lambda io: LoopbackAgent(io, config)
