"""The user's utterance under way, as it streams into the tokenizer."""

from __future__ import annotations

import uuid

import numpy as np

from realtime.events import TranscriptionDelta
from realtime.session import SessionIO
from streaming_tokenizer.base import StableCallback, StreamingTokenizer, UtteranceInput


class Utterance:
    """Owns the user's current utterance: its item id, the session's streaming tokenizer it is fed
    to, and its partial transcripts (`conversation.item.input_audio_transcription.delta`)."""

    def __init__(self, io: SessionIO, tokenizer: StreamingTokenizer) -> None:
        self._io = io
        self.tokenizer = tokenizer
        self.item_id = ""

    def new_item(self, item_id: str | None = None) -> str:
        self.item_id = item_id or "item_" + uuid.uuid4().hex[:12]
        return self.item_id

    def begin(self, audio: tuple[np.ndarray, ...], continued: bool, on_stable: StableCallback | None = None) -> None:
        """Speech started with `audio`: a new utterance, or more of the last one (`continued`).
        `on_stable` gets the start of its transcript that no later speech changes, as it grows."""
        if continued:
            for frame in audio:
                self.tokenizer.feed(frame, True)
            return
        item_id = self.new_item()

        def partial(heard: UtteranceInput) -> None:
            if self.item_id == item_id:  # each partial replaces the one before
                self._io.emit(TranscriptionDelta(item_id, heard.text))

        self.tokenizer.begin(audio, partial, on_stable)

    def hear(self, frame: np.ndarray, voiced: bool) -> None:
        self.tokenizer.feed(frame, voiced)
