"""Speech over the agent while it is judged: a turn of the user's, or a backchannel?"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from config import Interruption
from controller.reply import Reply
from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from streaming_tokenizer.base import StreamingTokenizer


class Overlap:
    """Owns the reply held paused while the user's speech over it is judged: the reply, the frame at
    which that speech was confirmed, and the task that judges it at the speech's first pause."""

    def __init__(self, reply: Reply, since_frame: int, tasks: TaskOwner, log: structlog.BoundLogger) -> None:
        self.reply = reply
        self.since_frame = since_frame
        self._tasks = tasks
        self._log = log
        self._judging: asyncio.Task[None] | None = None

    def too_long(self, frame_index: int, limits: Interruption) -> bool:
        """Whether the speech over the reply has lasted too long for a backchannel (it was
        confirmed `bargein_min_speech_ms` in)."""
        lasted_ms = (frame_index - self.since_frame) * FRAME_MS + limits.bargein_min_speech_ms
        return lasted_ms >= limits.backchannel_max_ms

    def judge(self, tokenizer: StreamingTokenizer, decide: Callable[[str | None], None]) -> None:
        """Transcribe the speech so far, then `decide(transcript)` (None: nothing could be heard)."""
        self._judging = self._tasks.spawn(self._judge(tokenizer, decide), f"interruption:{self.reply.id}")

    async def _judge(self, tokenizer: StreamingTokenizer, decide: Callable[[str | None], None]) -> None:
        try:
            user = await tokenizer.finalize()
            text: str | None = user.text if user.transcribe is None else await user.transcribe()
        except Exception as exc:  # unheard speech is taken for a turn, as without this check
            self._log.warning("controller.interruption_unheard", error=repr(exc))
            text = None
        self._judging = None  # this task: what `decide` ends must not cancel it
        decide(text)

    def stop_judging(self) -> None:
        """Speech again: it is judged anew at the next pause."""
        self._tasks.cancel(self._judging)
        self._judging = None

    def end(self, status: str) -> None:
        """The speech was a turn (or the reply is cancelled): the reply ends with what was heard
        before its pause."""
        self.stop_judging()
        self.reply.interrupt(status)

    def resume(self, item_id: str, transcript: str) -> None:
        """The speech (`item_id`) was not a turn: the reply plays on from where it paused."""
        self.stop_judging()
        self._log.info("controller.resumed", response_id=self.reply.id, item_id=item_id, transcript=transcript)
        self.reply.resume(item_id, transcript)
