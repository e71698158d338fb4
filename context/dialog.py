"""The dialog history: user transcripts and the assistant text the user actually heard."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from models.base import Message, ToolCall
from runtime.transcripts import fold_transcript

_WORD = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """Words and punctuation marks: close to BPE token counts for English, and never zero for text."""
    return len(_WORD.findall(text)) + 1


@dataclass(frozen=True)
class Turn:
    role: str  # "user", "assistant", "function_call" (text: its arguments) or "function_call_output"
    text: str
    status: str = "completed"  # or "interrupted"
    item_id: str = ""
    at: float = field(default_factory=time.time)
    call_id: str = ""  # a function call's and its output's
    name: str = ""  # a function call's function
    # What an LM that hears and speaks in its own ids reads instead of `text` (Message's fields of
    # the same names); kept in memory only, never in the transcript.
    audio: np.ndarray | None = field(default=None, compare=False, repr=False)
    ids: tuple[int, ...] = field(default=(), repr=False)

    def record(self) -> dict[str, Any]:
        """The turn as the transcript keeps it: its text and what it is, not its audio or ids."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("audio", "ids")}

    @property
    def shown(self) -> bool:
        """Whether the LM is shown this turn (a reply truncated to nothing is not)."""
        return bool(self.text or self.ids or self.audio is not None)


AUDIO_SAMPLES_PER_TOKEN = 1280  # Step-Audio 2 reads 16 kHz speech as 12.5 tokens a second


class TranscriptStore:
    """Owns the per-session JSONL transcripts under DATA_DIR/sessions/, and hands each record
    written to a mirror, if one is set (the workers' shared store)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "sessions"
        self._mirror: Callable[[str, str], None] | None = None

    def mirror(self, copy: Callable[[str, str], None]) -> None:
        """From now on, each record written is also given to `copy` (session id, JSON line)."""
        self._mirror = copy

    def path(self, session_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id):
            raise ValueError("bad session id")
        return self.root / f"{session_id}.jsonl"

    def append(self, session_id: str, record: dict[str, Any]) -> None:
        # One line written and fsync'd per turn, before the reply's response.done is sent: a crash,
        # even of the machine, loses at most the turn in flight.
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False)
        with self.path(session_id).open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._mirror is not None:
            self._mirror(session_id, line)

    def read(self, session_id: str) -> list[dict[str, Any]] | None:
        try:
            path = self.path(session_id)
        except ValueError:
            return None
        if not path.exists():
            return None
        return fold_transcript(path.read_text(encoding="utf-8", errors="replace").splitlines(), session_id)


class DialogContext:
    """Owns one session's history and what the LM sees of it: the system prompt always, then the
    newest turns that fit the token budget."""

    def __init__(
        self,
        system_prompt: str,
        max_tokens: int,
        store: TranscriptStore | None = None,
        session_id: str = "",
        count_tokens: Callable[[str], int] = estimate_tokens,
    ) -> None:
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.turns: list[Turn] = []
        self._store = store
        self._session_id = session_id
        self._count = count_tokens
        self._start = 0  # the oldest turn the prompt still shows
        self._deferred: list[Turn] = []
        self.refill = 0.6

    def add(self, turn: Turn) -> None:
        self._append(turn)
        if turn.role == "user":
            for deferred in self._deferred:
                self._append(deferred)
            self._deferred.clear()

    def defer(self, turn: Turn) -> None:
        """Add `turn` right after the next user turn: a function call made, or an output that came,
        before the turn it answers was in (a reply that the user's turn then swallowed, as when
        they went on speaking: the call still happened, and its result counts)."""
        self._deferred.append(turn)

    def _append(self, turn: Turn) -> None:
        self.turns.append(turn)
        if self._store is not None:
            self._store.append(self._session_id, turn.record())

    def replace_text(self, item_id: str, role: str, text: str, ids: tuple[int, ...] = ()) -> bool:
        """Give the newest `role` turn of `item_id` a new text and ids (a reply truncated to what
        was heard); the transcript gets a record that replaces the earlier one. False if none."""
        for index in range(len(self.turns) - 1, -1, -1):
            turn = self.turns[index]
            if turn.item_id == item_id and turn.role == role:
                self.turns[index] = replace(turn, text=text, ids=ids)
                if self._store is not None:
                    self._store.append(self._session_id, {**self.turns[index].record(), "replaces": True})
                return True
        return False

    def find(self, item_id: str) -> Turn | None:
        """The newest turn of `item_id` (its latest text), if the history holds one."""
        return next((turn for turn in reversed(self.turns) if turn.item_id == item_id), None)

    def delete(self, item_id: str) -> bool:
        """Take every turn of `item_id` out of the history (the transcript records that it left);
        False if there was none."""
        kept = [turn for turn in self.turns if turn.item_id != item_id]
        if len(kept) == len(self.turns):
            return False
        self._start -= sum(turn.item_id == item_id for turn in self.turns[: self._start])
        self.turns = kept
        if self._store is not None:
            self._store.append(self._session_id, {"item_id": item_id, "deleted": True, "at": time.time()})
        return True

    def messages(
        self, pending_user: str | None = None, system_prompt: str | None = None, pending_audio: np.ndarray | None = None
    ) -> list[Message]:
        """The LM prompt: system prompt (`system_prompt` for this prompt only, if given), the newest
        turns within budget, then the turn being answered (its speech, for an LM that hears it).

        Old turns leave in steps, down to `refill` of the budget, rather than one per turn: the
        prompt then keeps the same beginning for several turns, and an LM that caches the
        previous prompt only processes what is new.
        """
        system_prompt = self.system_prompt if system_prompt is None else system_prompt
        budget = self.max_tokens - self._count(system_prompt)
        tail: list[Message] = []
        if pending_user is not None:
            pending = Turn("user", pending_user, audio=pending_audio)
            tail.append(Message("user", pending_user, audio=pending_audio))
            budget -= self._cost(pending)
        costs = [self._cost(turn) for turn in self.turns]
        start = max(self._start, len(self.turns) - _fits(costs[self._start :][::-1], budget))
        if start != self._start:
            start = len(self.turns) - _fits(costs[start:][::-1], int(budget * self.refill))
        self._start = start
        kept = _as_messages(self.turns[start:])
        # A history that opens with an assistant turn confuses chat templates: drop the orphan.
        while kept and kept[0].role in ("assistant", "tool"):
            kept.pop(0)
        return [Message("system", system_prompt), *kept, *tail]

    def _cost(self, turn: Turn) -> int:
        """The turn's share of the budget: its ids, or its text, and its speech."""
        cost = len(turn.ids) if turn.ids else self._count(turn.text)
        return cost + (len(turn.audio) // AUDIO_SAMPLES_PER_TOKEN if turn.audio is not None else 0)


def _as_messages(turns: list[Turn]) -> list[Message]:
    """Turns as LM messages: each function call as an assistant message with the call, followed at
    once by its output (a call whose output is not in yet is left out); turns with nothing to show
    (a reply truncated to nothing) dropped."""
    outputs = {t.call_id: t for t in turns if t.role == "function_call_output"}
    out: list[Message] = []
    for turn in turns:
        if turn.role == "function_call":
            result = outputs.get(turn.call_id)
            if result is not None:
                out.append(Message("assistant", "", (ToolCall(turn.call_id, turn.name, turn.text),)))
                out.append(Message("tool", result.text, tool_call_id=turn.call_id))
        elif turn.role != "function_call_output" and turn.shown:
            out.append(Message(turn.role, turn.text, audio=turn.audio, ids=turn.ids))
    return out


def _fits(costs_newest_first: list[int], budget: int) -> int:
    """How many of the newest turns fit in `budget`."""
    count = 0
    for cost in costs_newest_first:
        if cost > budget:
            break
        budget -= cost
        count += 1
    return count


def _heard(chunks: list[tuple[Any, float]], heard_ms: float) -> Iterator[tuple[Any, float]]:
    """Each (content, duration_ms) chunk that `heard_ms` of playback reached, with the share of it
    heard: all of it, or for the one playing when it stopped, its elapsed part."""
    remaining = heard_ms
    for content, duration in chunks:
        if remaining <= 0:
            return
        yield content, min(1.0, remaining / duration) if duration > 0 else 1.0
        remaining -= duration


def heard_ids(chunks: list[tuple[tuple[int, ...], float]], heard_ms: float) -> tuple[int, ...]:
    """The ids of the (ids, duration_ms) chunks covered by `heard_ms` of playback; the chunk
    playing when it stopped contributes the share of its ids that fits its elapsed time."""
    return tuple(i for ids, share in _heard(chunks, heard_ms) for i in ids[: int(len(ids) * share)])


def heard_text(chunks: list[tuple[str, float]], heard_ms: float) -> str:
    """The text of the (text, duration_ms) chunks covered by `heard_ms` of playback; the chunk
    playing when it stopped contributes the share of its words that fits its elapsed time."""
    parts: list[str] = []
    for text, share in _heard(chunks, heard_ms):
        words = text.split()
        parts.append(text if share >= 1.0 else " ".join(words[: int(len(words) * share)]))
    return " ".join(p.strip() for p in parts if p.strip())
