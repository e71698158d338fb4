"""Which speech heard over a reply is the reply's own words come back."""

from __future__ import annotations

import pytest

from controller.own_voice import is_own_voice

pytestmark = pytest.mark.unit

SAID = "and so I can tell you that the knight rode on through the night until he saw a dragon"


@pytest.mark.parametrize(
    "heard, own",
    [
        ("The knight rode on.", True),
        ("Night, until he saw the.", True),  # misheard, as an echo is
        ("Knight wrote on the dragon", True),  # two of three telling words
        ("Can I ask you a question?", False),  # "can", "i", "you", "a" are in any reply
        ("Wait, what about the dragon?", False),  # the user, with one of the reply's words
        ("Dragon?", False),  # one telling word: the user's as likely as not
        ("", False),
    ],
)
def test_own_voice(heard, own):
    assert is_own_voice(heard, SAID) is own


def test_every_common_word_is_left_out():
    assert not is_own_voice("and so I have it, I do", "and so I have it, I do, do I not")
