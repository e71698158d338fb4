"""The interface every streaming tokenizer offers the controller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class UtteranceInput:
    """What one user utterance becomes for the LM.

    `text` is a transcript (shown to the user and kept in the history). `lm_content`, when set, is
    what the LM reads for this turn instead of the text, e.g. Step-Audio's `<audio_N>` tokens.
    `transcribe`, when set, makes the transcript later: the reply need not wait for it. `audio`,
    when set, is the utterance's 16 kHz speech, for an LM that hears it (Step-Audio 2).
    """

    text: str
    lm_content: str | None = None
    transcribe: Callable[[], Awaitable[str]] | None = field(default=None, compare=False)
    audio: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def empty(self) -> bool:
        return not self.text.strip() and not self.lm_content and (self.audio is None or not len(self.audio))


PartialCallback = Callable[[UtteranceInput], None]
StableCallback = Callable[[str], None]


class StreamingTokenizer(Protocol):
    """One session's tokenizer. begin() opens an utterance, feed() takes its 20 ms frames as they
    arrive, each marked voiced or not by the VAD (cheap: heavy work goes to a worker), finalize()
    returns everything fed so far and may be called again after more frames (a speculation that the
    user's resumed speech invalidated). Provisional results of the open utterance, if the tokenizer
    makes any, go to `on_partial`, each one replacing the previous; the start of the transcript that
    no later speech changes, if it knows one, goes to `on_stable` each time it grows (the LM can
    read that much of the turn ahead). aclose() stops all its work."""

    def begin(
        self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None, on_stable: StableCallback | None = None
    ) -> None: ...

    def feed(self, frame: np.ndarray, voiced: bool) -> None: ...

    async def finalize(self) -> UtteranceInput: ...

    async def aclose(self) -> None: ...

