"""Which transcripts of speech over the agent are a listener's acknowledgement, not a turn."""

from __future__ import annotations

import pytest

from controller.backchannel import is_backchannel

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "transcript",
    ["", "  ", "Mm-hmm.", "Uh-huh, yeah.", "Okay.", "OK", "Yeah, right.", "I see, I see.", "Got it.", "Hmm", "Um, um.", "Uh-hu", "I'm um.", "I. C..", "H.", "We'"],
)
def test_acknowledgements_and_unreadable_sounds_are_backchannels(transcript):
    assert is_backchannel(transcript)


@pytest.mark.parametrize(
    "transcript",
    ["Stop.", "No.", "Wait, stop please.", "Okay, but what about Paris?", "It's late.", "Yeah yeah yeah yeah yeah", "You", "Um, actually no.", "What?", "Why?", "Wait."],
)
def test_words_that_say_something_are_a_turn(transcript):
    assert not is_backchannel(transcript)
