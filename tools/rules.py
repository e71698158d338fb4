"""The rule that stands in for tool calling where the LM cannot call tools (the embedded profile's
SmolLM2-135M, measured: it answers "what time is it" with an apology and 17 x 23 with 321). It
routes only questions whose whole form it knows: the time or the date here (not in another place);
arithmetic said with numbers and operator words; a conversion between units. Anything else goes
to the LM as before."""

from __future__ import annotations

import json
import re

from models.base import ToolCall
from tools.builtin import unit_key

_TIME = re.compile(
    r"\b(what(?:'s| is)? the time|what time is it|tell me the time|(?:got|know|have) the time|the time (?:now|please)"
    r"|what(?:'s| is) (?:the |today's )?date|what(?:'s| is)? the date|what day is (?:it|today)|which day is (?:it|today)"
    r"|what(?:'s| is) today)\b",
    re.IGNORECASE,
)
_ELSEWHERE = re.compile(r"\b(?:time|date|day) (?:is it )?(?:in|at) [a-z]", re.IGNORECASE)  # another place's: not ours
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_OPERATOR_WORDS = [
    ("to the power of", "**"), ("multiplied by", "*"), ("divided by", "/"), ("percent of", "% of"), ("times", "*"),
    ("plus", "+"), ("minus", "-"), ("over", "/"), ("x", "*"), ("squared", "** 2"), ("cubed", "** 3"),
]
_ASK = re.compile(r"^(?:so |and |ok(?:ay)? |hey |please )*(?:what(?:'s| is)|how much is|calculate|compute|can you (?:calculate|compute|tell me))\s+(.+?)[?.!]*$", re.IGNORECASE)
_CONVERT = re.compile(
    r"(?:convert|what(?:'s| is)|how much is)\s+(?P<value>[\w.\- ]+?)\s+(?P<from>(?:degrees )?[a-z/°]+)\s+(?:to|in|into)\s+(?P<to>(?:degrees )?[a-z/°]+)[?.!]*$"
    r"|how many\s+(?P<to2>(?:degrees )?[a-z/°]+)\s+(?:are |is )?(?:there )?in\s+(?P<value2>[\w.\- ]+?)\s+(?P<from2>(?:degrees )?[a-z/°]+)[?.!]*$",
    re.IGNORECASE,
)


def _number(words: str) -> float | None:
    """A number written in digits or in English words ("two hundred and five")."""
    text = words.strip().lower().replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    total, current, seen = 0, 0, False
    for word in re.split(r"[\s-]+", text.replace(" and ", " ")):
        if word in _ONES:
            current += _ONES.index(word)
        elif word in _TENS:
            current += _TENS[word]
        elif word in _SCALES:
            current = max(current, 1) * _SCALES[word]
            if _SCALES[word] > 100:
                total, current = total + current, 0
        elif word in ("a", "an") and not seen:
            current += 1
        else:
            return None
        seen = True
    return float(total + current) if seen else None


def _expression(text: str) -> str | None:
    """Arithmetic said in words as Python arithmetic, or None when it is anything else."""
    spaced = f" {text.lower().strip()} "
    for words, symbol in _OPERATOR_WORDS:
        spaced = re.sub(rf"(?<=\s){re.escape(words)}(?=\s)", f" {symbol} ", spaced)
    parts = re.split(r"(\*\*|% of|[*/+\-])", spaced)
    out = []
    for part in parts:
        part = part.strip()
        if part in ("**", "% of", "*", "/", "+", "-"):
            out.append(part)
        elif part:
            value = _number(part)
            if value is None:
                return None
            out.append(format(value, "g"))
    operators = [i for i, p in enumerate(out) if p in ("**", "% of", "*", "/", "+", "-")]
    # Numbers and operators in turn, starting and ending with a number, at least one operator.
    if not operators or operators != list(range(1, len(out), 2)) or len(out) % 2 == 0:
        return None
    return " ".join(out)


def route(text: str) -> ToolCall | None:
    """The call a user's words ask for, when they are one of the questions the rule knows."""
    text = " ".join(text.split())
    if _TIME.search(text) and not _ELSEWHERE.search(text):
        return ToolCall("rule_time", "current_time", "{}")
    if match := _CONVERT.search(text):
        value = _number(match.group("value") or match.group("value2") or "")
        source, target = match.group("from") or match.group("from2"), match.group("to") or match.group("to2")
        if value is not None:
            try:
                unit_key(source), unit_key(target)
            except ValueError:
                pass
            else:
                arguments = {"value": value, "from_unit": source, "to_unit": target}
                return ToolCall("rule_convert", "convert_units", json.dumps(arguments))
    if match := _ASK.search(text):
        expression = _expression(match.group(1))
        if expression is not None:
            return ToolCall("rule_calculate", "calculate", json.dumps({"expression": expression}))
    return None
