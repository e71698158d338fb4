"""The tools a voice assistant needs offline: the time and date, arithmetic, unit conversion. Each
answers with the facts and a `spoken` sentence (what the agent says when a rule, not the LM, asked)."""

from __future__ import annotations

import ast
import datetime
import math
import operator
from typing import Any

_OPERATORS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log10, "ln": math.log, "sin": math.sin, "cos": math.cos}


def _spoken_number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ") if abs(value) >= 10000 else str(value)
    return f"{value:.6g}"


def current_time() -> dict[str, str]:
    """The current date and time where the agent runs, with its time zone. Use it for any question
    about the time, the date, or the day of the week."""
    now = datetime.datetime.now().astimezone()
    hour = now.strftime("%I").lstrip("0") or "12"
    return {
        "iso": now.isoformat(timespec="seconds"),
        "time": now.strftime("%H:%M"),
        "date": now.strftime("%A, %d %B %Y"),
        "timezone": now.tzname() or "",
        "spoken": f"It's {hour}:{now.strftime('%M')} {now.strftime('%p')} on {now.strftime('%A, %B')} {now.day}.",
    }


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        return _FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
    if isinstance(node, ast.Name) and node.id in ("pi", "e"):
        return math.pi if node.id == "pi" else math.e
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")


def calculate(expression: str) -> dict[str, str]:
    """Evaluate an arithmetic expression exactly, e.g. "17 * 23", "(3 + 4) ** 2", "sqrt(2)", or
    "15 % of 80" for a percentage.

    Args:
        expression: the arithmetic, in Python notation (+ - * / ** and parentheses)
    """
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace("%of", "% of")
    if " % of " in f" {text} ":
        percent, _, whole = text.partition("% of")
        text = f"({percent}) / 100 * ({whole})"
    if len(text) > 200:
        raise ValueError("expression too long")
    value = _evaluate(ast.parse(text.strip(), mode="eval"))
    return {"expression": expression, "result": _spoken_number(value), "spoken": f"{_said(expression)} is {_spoken_number(value)}."}


_SAID = (("**", " to the power of "), ("*", " times "), ("/", " divided by "), ("+", " plus "), ("-", " minus "), ("%", " percent "))


def _said(expression: str) -> str:
    """An expression as words a voice reads well ("17 * 23" -> "17 times 23")."""
    for symbol, words in _SAID:
        expression = expression.replace(symbol, words)
    return " ".join(expression.split())


# Each unit in a base unit of its kind (temperatures are converted apart).
_UNITS: dict[str, tuple[str, float]] = {
    "mm": ("length", 0.001), "millimeter": ("length", 0.001), "cm": ("length", 0.01), "centimeter": ("length", 0.01),
    "m": ("length", 1.0), "meter": ("length", 1.0), "km": ("length", 1000.0), "kilometer": ("length", 1000.0),
    "in": ("length", 0.0254), "inch": ("length", 0.0254), "ft": ("length", 0.3048), "foot": ("length", 0.3048),
    "feet": ("length", 0.3048), "yd": ("length", 0.9144), "yard": ("length", 0.9144), "mi": ("length", 1609.344),
    "mile": ("length", 1609.344),
    "g": ("mass", 0.001), "gram": ("mass", 0.001), "kg": ("mass", 1.0), "kilogram": ("mass", 1.0),
    "lb": ("mass", 0.45359237), "pound": ("mass", 0.45359237), "oz": ("mass", 0.028349523125), "ounce": ("mass", 0.028349523125),
    "ml": ("volume", 0.001), "milliliter": ("volume", 0.001), "l": ("volume", 1.0), "liter": ("volume", 1.0),
    "litre": ("volume", 1.0), "gallon": ("volume", 3.785411784), "cup": ("volume", 0.2365882365),
    "s": ("time", 1.0), "second": ("time", 1.0), "min": ("time", 60.0), "minute": ("time", 60.0),
    "h": ("time", 3600.0), "hour": ("time", 3600.0), "day": ("time", 86400.0), "week": ("time", 604800.0),
    "kmh": ("speed", 1 / 3.6), "km/h": ("speed", 1 / 3.6), "mph": ("speed", 0.44704), "m/s": ("speed", 1.0),
}
_TEMPERATURES = {"c": "celsius", "celsius": "celsius", "f": "fahrenheit", "fahrenheit": "fahrenheit", "k": "kelvin", "kelvin": "kelvin"}


def unit_key(name: str) -> str:
    """The table's key for a unit as people write it (plurals, `degrees`, `°`); ValueError if unknown."""
    key = name.strip().lower().replace("degrees ", "").replace("°", "")
    if key in _UNITS or key in _TEMPERATURES:
        return key
    if key.endswith("es") and key[:-2] in _UNITS:
        return key[:-2]
    if key.endswith("s") and key[:-1] in _UNITS | _TEMPERATURES:
        return key[:-1]
    raise ValueError(f"unknown unit {name!r}")


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, str]:
    """Convert a quantity between units of length, mass, volume, time, speed or temperature (e.g.
    miles to kilometers, pounds to kilograms, Fahrenheit to Celsius).

    Args:
        value: the quantity in from_unit
        from_unit: the unit it is in, e.g. "mile", "lb", "fahrenheit"
        to_unit: the unit wanted, e.g. "km", "kg", "celsius"
    """
    source, target = unit_key(from_unit), unit_key(to_unit)
    if source in _TEMPERATURES and target in _TEMPERATURES:
        kelvin = {"celsius": value + 273.15, "fahrenheit": (value - 32) * 5 / 9 + 273.15, "kelvin": value}[_TEMPERATURES[source]]
        result = {"celsius": kelvin - 273.15, "fahrenheit": (kelvin - 273.15) * 9 / 5 + 32, "kelvin": kelvin}[_TEMPERATURES[target]]
    else:
        (kind, scale), (target_kind, target_scale) = _UNITS.get(source, ("", 0)), _UNITS.get(target, ("", 0))
        if not kind or kind != target_kind:
            raise ValueError(f"cannot convert {from_unit} to {to_unit}")
        result = value * scale / target_scale
    rounded = _spoken_number(round(result, 4))
    return {"result": rounded, "spoken": f"{_spoken_number(value)} {from_unit} is {rounded} {to_unit}."}


BUILTIN = (current_time, calculate, convert_units)
