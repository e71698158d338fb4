"""The agent's own voice heard back: speech over a reply whose words are the words the reply was
just saying is the echo a speakerphone returned and the canceller left, not a turn of the user's."""

from __future__ import annotations

from controller.backchannel import words

SAID_BEFORE_MS = 4000  # how far back from what the client heard the reply's words are looked for
SAID_AFTER_MS = 1000  # and ahead of it: the client's buffer, a word heard in part
MIN_WORDS = 2  # telling words; one is as likely the user's ("seven?"): it is judged as any other speech
SHARE = 2 / 3  # of the words heard, at least this many the reply's own (the ASR mishears an echo)


# Words any sentence has: a user's "Stop, I have a question" shares "i", "have" and "a" with most
# replies. Only the other words are compared.
COMMON = frozenset(
    "i i'm me my you your it it's is are was were be been a an the and or but so to of in on at for with "
    "that this there what do does did have has had can will would not no".split()
)


def is_own_voice(transcript: str, said: str) -> bool:
    """Whether `transcript`, heard over the agent, is mostly the words it `said` around then."""
    heard = [word for word in words(transcript) if word not in COMMON]
    if len(heard) < MIN_WORDS:
        return False
    own = set(words(said))
    return sum(word in own for word in heard) >= SHARE * len(heard)
