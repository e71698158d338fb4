"""The stop flag of a transformers generation running in a worker thread, checked at each step."""

from __future__ import annotations

import threading
from typing import Any


def stopping_on(stop: threading.Event) -> Any:
    """A StoppingCriteriaList that ends generate() at the first step after `stop` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([Stopped()])
