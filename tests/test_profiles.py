"""What a profile loaded is freed at the end: every worker, then every engine closing itself."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from profiles.loaded import close_models
from runtime.workers import ModelWorker

pytestmark = pytest.mark.unit


@dataclass
class Engine:
    """An LM or decoder that records its close, and whether the workers were gone by then."""

    workers: tuple[ModelWorker, ...]
    closed_after_workers: bool | None = None

    async def aclose(self) -> None:
        self.closed_after_workers = not set(self.workers) & set(ModelWorker.live())


@dataclass
class Loaded:
    workers: tuple[ModelWorker, ...]
    engines: tuple[Engine, ...]
    decoder: Engine
    turn_end: None = None


async def test_every_engine_closes_itself_after_the_workers():
    workers = (ModelWorker("a"), ModelWorker("b"))
    lm, turn_lm, decoder = Engine(workers), Engine(workers), Engine(workers)
    await close_models(Loaded(workers, (lm, turn_lm), decoder))  # type: ignore[arg-type]
    assert [e.closed_after_workers for e in (lm, turn_lm, decoder)] == [True, True, True]
