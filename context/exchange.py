"""The order of one exchange in the history: the user's turn, then the reply that answers it."""

from __future__ import annotations

import numpy as np

from context.dialog import DialogContext, Turn


class Exchange:
    """Owns the history entries of one user turn and its reply (its function calls and their
    outputs included), and keeps them in that order whichever is ready first: a reply can end
    before its user's transcript exists (a transcript made beside the reply), and then waits for it.
    An exchange that does not `keep` adds nothing (a reply out of band: only its events tell it)."""

    def __init__(self, context: DialogContext, item_id: str, hold_reply: bool = True, keep: bool = True) -> None:
        self._context = context
        self._keep = keep
        self.item_id = item_id
        self.user_recorded = False
        self._hold_reply = hold_reply
        self._held: list[Turn] = []

    def add_user(self, text: str | None, audio: np.ndarray | None = None) -> None:
        """The user's turn is final: `text` (and its `audio`, for an LM that hears it) goes into the
        history (None: nothing to keep), then the reply's turn if it was waiting."""
        self.user_recorded = True
        if text is not None:
            self._context.add(Turn("user", text, "completed", self.item_id, audio=audio))  # then the deferred function items
        for turn in self._held:
            self._context.add(turn)
        self._held.clear()

    def add_function_item(self, turn: Turn) -> None:
        """A function call or its output: after the user's turn, even if this exchange never
        records one (a reply swallowed by the user's continued turn: the next user turn takes it)."""
        if not self._keep:
            return
        if self.user_recorded:
            self._context.add(turn)
        else:
            self._context.defer(turn)

    def add_reply(self, turn: Turn) -> None:
        if not self._keep:
            return
        if self.user_recorded or not self._hold_reply:
            self._context.add(turn)
        else:
            self._held.append(turn)
