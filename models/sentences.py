"""Streamed LM text for speech: cut into pieces a speech decoder can start on early, and ended
after a few sentences."""

from __future__ import annotations

import re
from contextlib import aclosing
from typing import Any, AsyncGenerator

from models.base import LanguageModel, Message, ToolCall

# CJK sentence ends need no space after them (Step-Audio speaks Chinese first).
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"')\]]*\s|[\u3002\uff01\uff1f]+[\u201d\u300d\uff09]*|\n+")
_CLAUSE_END = re.compile(r"[,;:\u2013\u2014]\s|[\uff0c\uff1b\uff1a\u3001]")
# Kana, CJK ideographs, Hangul syllables: written without spaces, each counts as a word here.
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
# A word that is complete: a CJK character, or other text followed by a space.
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+\s")
_MARKUP = re.compile(r"[*_#`~<>|\[\]]+|^\s*(?:[-+]|\d+[.)])\s+", re.MULTILINE)
_SPACES = re.compile(r"\s+")


def speakable(text: str) -> str:
    """The text with markdown and list markers removed: what a listener should hear."""
    return _SPACES.sub(" ", _MARKUP.sub(" ", text)).strip()


class SpeechChunker:
    """Owns the text not yet cut: push() LM deltas in, get back the pieces ready to speak.

    A piece ends at a sentence end, or at a clause boundary once the clause has `clause_words`
    words, or after `max_words` words without either. The first piece is cut sooner (at its first
    clause boundary, "Sure," or "Well,", or after `first_max_words` words): the first audio waits
    for it, and the LM outruns speech, so later pieces are ready before they are needed. A sentence
    end counts only once the next character is in, so "3.5" and "e.g." followed by more text are
    not cut.
    """

    def __init__(
        self, first_clause_words: int = 1, first_max_words: int = 4, clause_words: int = 8, max_words: int = 30
    ) -> None:
        self.first_clause_words = first_clause_words
        self.first_max_words = first_max_words
        self.clause_words = clause_words
        self.max_words = max_words
        self._buffer = ""
        self._pieces = 0

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        out: list[str] = []
        while (cut := self._next_cut()) is not None:
            piece, self._buffer = self._buffer[:cut], self._buffer[cut:]
            self._emit(piece, out)
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        piece, self._buffer = self._buffer, ""
        self._emit(piece, out)
        return out

    def _emit(self, piece: str, out: list[str]) -> None:
        text = speakable(piece)
        if any(ch.isalnum() for ch in text):
            out.append(text)
            self._pieces += 1

    def _next_cut(self) -> int | None:
        sentence = _SENTENCE_END.search(self._buffer)
        if sentence is not None:
            return sentence.end()
        first = self._pieces == 0
        needed = self.first_clause_words if first else self.clause_words
        for clause in _CLAUSE_END.finditer(self._buffer):
            if _words(self._buffer[: clause.start()]) >= needed:
                return clause.end()
        most = self.first_max_words if first else self.max_words
        words = list(_WORD.finditer(self._buffer))
        if len(words) >= most:
            return words[most - 1].end()
        return None


def _words(text: str) -> int:
    return len(re.findall(rf"[{_CJK}]|[^\s{_CJK}]+", text))


class SpokenReplies:
    """Wraps an LM so that each reply ends with its `max_sentences`-th sentence: a spoken answer
    stays short, and the LM stops generating there instead of running to its token limit. Tool
    calls pass through (a reply that calls one ends there anyway)."""

    def __init__(self, lm: LanguageModel, max_sentences: int) -> None:
        self.lm = lm
        self.max_sentences = max_sentences
        self.calls_tools = lm.calls_tools

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str | ToolCall, None]:
        text, passed, scanned, sentences = "", 0, 0, 0
        async with aclosing(self.lm.stream(messages, max_new_tokens=max_new_tokens, tools=tools)) as deltas:
            async for delta in deltas:
                if isinstance(delta, ToolCall):
                    yield delta
                    continue
                text += delta
                # A sentence end counts once the character after it is in ("3.5" is no end).
                while end := _SENTENCE_END.search(text, scanned):
                    scanned, sentences = end.end(), sentences + 1
                    if sentences == self.max_sentences:
                        last = text[:scanned].rstrip()
                        if len(last) > passed:
                            yield last[passed:]
                        return
                if len(text) > passed:
                    yield text[passed:]
                    passed = len(text)

    async def aclose(self) -> None:
        await self.lm.aclose()
