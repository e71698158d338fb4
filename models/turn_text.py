"""The text half of end-of-turn detection: how likely a chat LM thinks the user's turn ends here."""

from __future__ import annotations

import re

from models.llamacpp_lm import LlamaCppLM

# SmolLM2's chat format (ChatML): the user's words, then what would come next.
CHATML_USER = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}"
ENDINGS = ("<|im_end|>", ".", "?", "!")
# Punctuation, and an apostrophe that is not inside a word ("don't" keeps its own): Moonshine sometimes
# starts a transcript with stray quotes ("\"'Tell me a long story about a dragon."), and a quote left open
# scored the sentence 0.006 (0.19 without it): the turn waited max_commit_ms (live, over /ws, a call's
# first request in 1 call of 2).
_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


class TextTurnEnd:
    """Owns the prompt that asks the LM for P(end of turn | transcript): the probability that the
    user turn closes, or a sentence ends, right after the words, written without punctuation (the
    ASR's own full stop must not give the answer away). Unfinished phrases ("I want to book a table
    for") score below 0.01, finished ones 0.1-0.9, in 20-90 ms."""

    def __init__(self, lm: LlamaCppLM, system_prompt: str) -> None:
        self._lm = lm
        self._system = system_prompt

    async def score(self, transcript: str) -> float | None:
        words = _PUNCTUATION.sub("", transcript.lower()).strip()
        if not words:
            return None
        probabilities = await self._lm.next_token_probabilities(CHATML_USER.format(system=self._system, text=words))
        return sum(p for token, p in probabilities.items() if token.strip() in ENDINGS)
