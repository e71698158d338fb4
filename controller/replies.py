"""The session's replies: the one under way, the one held under the user's speech, the latest ended
ones, and what they count."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import structlog

from context.dialog import DialogContext
from controller.overlap import Overlap
from controller.reply import Reply, SessionModels
from models.base import PromptCache
from realtime.events import ConversationItemTruncate, ConversationItemTruncated, Error, ResponseOrder, SessionSummary
from realtime.session import SessionIO
from runtime.tasks import TaskOwner
from streaming_tokenizer.base import UtteranceInput

ENDED_REPLIES_KEPT = 8


@dataclass
class Counters:
    speculative_starts: int = 0
    speculative_commits: int = 0
    speculative_cancels: int = 0
    responses: int = 0
    bargeins: int = 0
    resumes: int = 0  # speech over the agent that proved not a turn: the reply played on
    late_resumes: int = 0  # speech soon after a commit (the reply barely heard): one utterance continued
    own_voice: int = 0  # of the resumes: the reply's own words, come back from a client that does not cancel echo


class Replies:
    """Owns the session's replies: the one under way (`current`: prepared at a pause, or playing),
    the one held paused while speech over it is judged (`held`, an Overlap), the latest ended ones
    (a truncate may still cut them back), and the session's counters. Starts, commits, holds and
    ends them; each reply's end is booked here, then `on_ended(reply, held)` is told (`held`: it
    ended by itself while held)."""

    def __init__(
        self,
        io: SessionIO,
        models: SessionModels,
        context: DialogContext,
        tasks: TaskOwner,
        log: structlog.BoundLogger,
        counters: Counters,
        on_ended: Callable[[Reply, bool], None],
    ) -> None:
        self._io, self._models, self._context, self._tasks, self._log = io, models, context, tasks, log
        self.counters = counters
        self._on_ended = on_ended
        self.current: Reply | None = None
        self.held: Overlap | None = None
        self.speak = True  # the session's replies are spoken (else text only)
        self._turn_numbers = itertools.count(1)
        self._ended: dict[str, Reply] = {}
        self._prefill: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Whether a reply is playing or held (not just being prepared)."""
        return self.held is not None or (self.current is not None and self.current.committed)

    @property
    def transcript(self) -> str | None:
        """The transcript of the utterance the current reply answers, once it has one."""
        reply = self.current
        return reply.user.text if reply is not None and reply.user is not None else None

    def start(self, item_id: str, speculative: bool, preset: UtteranceInput | None = None, order: ResponseOrder | None = None) -> Reply:
        """A new reply to the utterance `item_id` (`preset`: a typed message; `order`: a
        `response.create`, which answers the history as it stands), under way at once."""
        reply_id = "resp_" + uuid.uuid4().hex[:12]
        self.current = Reply(
            reply_id, item_id, speculative, self._io, self._models, self._context, self._tasks, self._done, preset, order, self.speak,
            self._prefill if preset is None and order is None else None,
        )
        self.counters.speculative_starts += speculative
        return self.current

    def prefill(self, text: str) -> None:
        """The start of the user's turn under way is known for good: the LM reads it ahead, with the
        history before it, if it keeps prompts (one at a time; a newer start waits for the next)."""
        cache = self._models.prompt_cache
        if cache is None or (self._prefill is not None and not self._prefill.done()):
            return
        self._prefill = self._tasks.spawn(self._read_ahead(cache, text), "prefill")

    async def _read_ahead(self, cache: PromptCache, text: str) -> None:
        try:
            await cache.prefill(self._context.messages(pending_user=text))
        except Exception as exc:  # only time is lost: the reply evaluates the whole prompt
            self._log.warning("lm.prefill_failed", error=repr(exc))

    def commit(self, item_id: str, voice_end_at: float, merge_heard_ms: int, how: dict[str, float | str]) -> None:
        """The user's turn `item_id` is over: the reply prepared for it plays now (or one starts)."""
        reply = self.current
        if reply is None or reply.committed:
            reply = self.start(item_id, speculative=False)
        else:
            self.counters.speculative_commits += 1
        self.commit_reply(reply, voice_end_at, merge_heard_ms, how)

    def commit_reply(self, reply: Reply, voice_end_at: float, merge_heard_ms: int, how: dict[str, float | str]) -> None:
        self.counters.responses += 1
        reply.commit(next(self._turn_numbers), voice_end_at, merge_heard_ms, how)

    def cancel_speculation(self) -> None:
        """Drop the reply being prepared, if any: nothing of it is heard or stored."""
        reply = self.current
        if reply is not None and not reply.committed:
            self.current = None
            reply.cancel()
            self.counters.speculative_cancels += 1

    def interrupt(self, status: str) -> None:
        """End the current reply now, keeping only what was heard."""
        reply, self.current = self.current, None
        if reply is not None:
            reply.interrupt(status)

    def take(self) -> Reply | None:
        """The current reply leaves the session (merged into the user's continued turn)."""
        reply, self.current = self.current, None
        return reply

    def hold(self, since_frame: int) -> None:
        """Speech over the current reply, confirmed at `since_frame`: it waits, paused, to be judged."""
        reply, self.current = self.current, None
        assert reply is not None
        reply.pause()
        self.held = Overlap(reply, since_frame, self._tasks, self._log)

    def end_held(self, status: str, bargein: bool = False) -> bool:
        """End the held reply, if any (keeping what was heard before its pause); whether there was one."""
        held, self.held = self.held, None
        if held is None:
            return False
        self.counters.bargeins += bargein
        held.end(status)
        return True

    def resume_held(self, item_id: str, transcript: str) -> None:
        """The speech over the held reply (`item_id`) was not a turn: it plays on where it paused."""
        held, self.held = self.held, None
        assert held is not None
        self.current = held.reply
        self.counters.resumes += 1
        held.resume(item_id, transcript)

    def truncate(self, event: ConversationItemTruncate) -> None:
        """The client played only `audio_end_ms` of a reply: while it runs (current or held), that
        is what an interruption will keep; once it ended, its history entry is cut back to it."""
        held = self.held.reply if self.held is not None else None
        live = next((r for r in (self.current, held) if r is not None and r.id == event.item_id), None)
        ended = self._ended.get(event.item_id)
        if live is not None:
            self._io.playback.report(event.audio_end_ms, live.id)
            heard = live.heard_in(event.audio_end_ms)
        elif ended is not None:
            heard = ended.heard_in(event.audio_end_ms)
            self._context.replace_text(event.item_id, "assistant", heard, ended.heard_ids_in(event.audio_end_ms))
        else:
            self._io.emit(Error("item_not_found", f"no reply {event.item_id!r} in this session", event.event_id))
            return
        self._io.emit(ConversationItemTruncated(event.item_id, event.audio_end_ms, heard))

    def _done(self, reply: Reply) -> None:
        if self.current is reply:
            self.current = None
        held = self.held is not None and self.held.reply is reply  # all of it had gone out before the pause
        if self.held is not None and held:
            self.held.stop_judging()
            self.held = None
        if reply.committed:
            self._ended[reply.id] = reply
            while len(self._ended) > ENDED_REPLIES_KEPT:
                self._ended.pop(next(iter(self._ended)))
        self._on_ended(reply, held)
        if reply.committed:
            self._io.emit(SessionSummary(asdict(self.counters)))
