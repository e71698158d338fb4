"""What a listener says to keep the speaker going ("mm-hmm", "okay", "I see"): not a turn of its own."""

from __future__ import annotations

import re

# Single words, as ASR engines spell them ("Mm-hmm" splits at the hyphen into two of these). Fillers
# are in: on their own they say nothing to answer.
WORDS = frozenset(
    "mm mmm mhm mmhmm hm hmm uh huh hu uhhuh um umm er erm ah oh okay ok yeah yes yep yup right sure alright cool wow".split()
)
# Words that carry nothing to answer on their own: what a small ASR makes of a hum or a short
# acknowledgement heard at its first pause (Moonshine: "I'm um." for "mm-hmm", "I. C.." for "I see").
FUNCTION_WORDS = frozenset("i i'm a an the and so then it it's that this in of to".split())
PHRASES = re.compile(r"\b(i see|got it|all right|go on)\b")
MAX_WORDS = 4


def _fragment(token: str) -> bool:
    """A piece the ASR made of a sound it could not read ("H.", "We'"), not a word."""
    return (len(token) == 1 and token not in "ia") or token.endswith("'")


def words(transcript: str) -> list[str]:
    """The words of an ASR transcript, lower case, without punctuation and the fragments it makes
    of sounds it could not read."""
    return [t for t in re.findall(r"[a-z']+", transcript.lower().replace("-", " ")) if not _fragment(t)]


def is_backchannel(transcript: str) -> bool:
    """Whether `transcript` holds no words, or only a listener's acknowledgement (at most
    MAX_WORDS, no word that says something): the speaker should go on."""
    said = PHRASES.sub(" ", " ".join(words(transcript))).split()
    return len(said) <= MAX_WORDS and all(word in WORDS or word in FUNCTION_WORDS for word in said)
