"""What every transformers generation in a worker thread needs: a way to hand its output to the
event loop, and a stop flag that generate() checks at each step."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[T], stop: threading.Event) -> Callable[[T], None]:
    """put_nowait from the worker thread; once the loop is gone, nobody listens: stop generating."""

    def post(item: T) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            stop.set()

    return post


def stopping_on(stop: threading.Event) -> Any:
    """A StoppingCriteriaList that ends generate() at the first step after `stop` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([Stopped()])
