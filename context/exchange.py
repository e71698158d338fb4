"""The order of one exchange in the history: the user's turn, then the reply that answers it."""

from __future__ import annotations

from context.dialog import DialogContext, Turn


class Exchange:
    """Owns the history entries of one user turn and its reply, and keeps them in that order
    whichever is ready first: a reply can end before its user's transcript exists (a transcript
    made beside the reply), and then waits for it."""

    def __init__(self, context: DialogContext, item_id: str, hold_reply: bool = True) -> None:
        self._context = context
        self.item_id = item_id
        self.user_recorded = False
        self._hold_reply = hold_reply
        self._held: Turn | None = None

    def add_user(self, text: str | None) -> None:
        """The user's turn is final: `text` goes into the history (None: nothing to keep), then the
        reply's turn if it was waiting."""
        self.user_recorded = True
        if text is not None:
            self._context.add(Turn("user", text, "completed", self.item_id))
        if self._held is not None:
            self._context.add(self._held)
            self._held = None

    def add_reply(self, turn: Turn) -> None:
        if self.user_recorded or not self._hold_reply:
            self._context.add(turn)
        else:
            self._held = turn
