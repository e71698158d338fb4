"""Text metrics for transcripts: word error rate after the normalization ASR comparisons need."""

from __future__ import annotations

import re

_NUMBERS = {
    "0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
    "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten",
}


def normalize_words(text: str) -> list[str]:
    """Lower case, no punctuation, hyphenated words joined, small numbers spelled out:
    "It's 7 to-night." -> ["its", "seven", "tonight"]."""
    words = re.sub(r"[^\w\s']", " ", text.lower().replace("-", "")).replace("'", "").split()
    return [_NUMBERS.get(word, word) for word in words]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words; 0.0 when both are empty."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / len(ref)
