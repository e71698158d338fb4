"""Tools from plain Python functions: type hints and docstrings become OpenAI-style JSON schemas;
each call runs with a timeout, and whatever goes wrong becomes the output the LM sees."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from models.base import ToolCall

log = structlog.get_logger(__name__)

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARG = re.compile(r"(\w+)\s*(?:\([^)]*\))?:\s*(.*)")  # "name: text" or "name (type): text"


class ToolSetupError(ValueError):
    """A tools module that cannot be used; the message says which function and why."""


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: its output for the LM (JSON text or the tool's string), whether it worked,
    and how long it took."""

    call: ToolCall
    output: str
    ok: bool
    ms: float


@dataclass(frozen=True)
class Tool:
    """One callable function: its schema and the function (sync or async)."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout_s: float

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _json_type(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _json_type(options[0])
    if origin is typing.Literal:
        values = list(typing.get_args(hint))
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "enum": values}
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return {"type": "array", "items": _json_type(args[0]) if args else {}}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise ToolSetupError(f"type {hint!r} has no JSON schema here (use str, int, float, bool, Literal, list)")


def _describe(docstring: str) -> tuple[str, dict[str, str]]:
    """A docstring's first paragraph, and each parameter's line under `Args:` (Google style)."""
    text = inspect.cleandoc(docstring)
    summary = " ".join(text.split("\n\n", 1)[0].split())
    params: dict[str, str] = {}
    in_args = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
        elif in_args and line[:1].isspace() and (item := _ARG.match(stripped)):
            params[item.group(1)] = item.group(2)
        elif stripped and not line[:1].isspace():
            in_args = False  # the next section, or more prose
    return summary, params


def tool_from_function(function: Callable[..., Any], timeout_s: float) -> Tool:
    """A tool from a function with type hints and a docstring (the docstring's first paragraph
    describes it; an `Args:` section describes its parameters)."""
    name = function.__name__
    if not function.__doc__:
        raise ToolSetupError(f"{name}: a tool needs a docstring (the LM reads it to decide when to call)")
    description, param_docs = _describe(function.__doc__)
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolSetupError(f"{name}: *args and **kwargs cannot be described to an LM")
        if parameter.name not in hints:
            raise ToolSetupError(f"{name}: parameter {parameter.name!r} has no type hint")
        try:
            schema = _json_type(hints[parameter.name])
        except ToolSetupError as exc:
            raise ToolSetupError(f"{name}.{parameter.name}: {exc}") from None
        if parameter.name in param_docs:
            schema["description"] = param_docs[parameter.name]
        properties[parameter.name] = schema
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name, description, parameters, function, getattr(function, "timeout_s", timeout_s))


def module_tools(module_name: str, timeout_s: float) -> list[Tool]:
    """The tools of a Python module: its `TOOLS` list if it has one, else every public function
    defined in it (not imported into it)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolSetupError(f"--tools {module_name}: cannot import it ({exc})") from None
    functions = getattr(module, "TOOLS", None)
    if functions is None:
        functions = [
            f
            for name, f in vars(module).items()
            if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__
        ]
    if not functions:
        raise ToolSetupError(f"--tools {module_name}: no public functions in it")
    return [tool_from_function(f, timeout_s) for f in functions]


class Toolbox:
    """Owns the tools one server offers, and how long a reply waits on them before it says so
    (`filler_ms`); stateless between calls."""

    def __init__(self, tools: list[Tool], filler_ms: float = 700.0) -> None:
        self.filler_s = filler_ms / 1000
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ToolSetupError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    async def run(self, call: ToolCall) -> ToolResult:
        """Run one call to its end, its timeout, or its failure: never raises (bar cancellation)."""
        started = time.monotonic()

        def result(output: Any, ok: bool) -> ToolResult:
            text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False, default=str)
            ms = round(1000 * (time.monotonic() - started), 1)
            log.info("tool.ran", name=call.name, call_id=call.id, ok=ok, ms=ms)
            return ToolResult(call, text, ok, ms)

        tool = self.tools.get(call.name)
        if tool is None:
            return result({"error": f"no function named {call.name!r}"}, False)
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("the arguments are not a JSON object")
            inspect.signature(tool.function).bind(**arguments)
        except (ValueError, TypeError) as exc:
            return result({"error": f"bad arguments for {call.name}: {exc}"}, False)
        try:
            if inspect.iscoroutinefunction(tool.function):
                output = await asyncio.wait_for(tool.function(**arguments), tool.timeout_s)
            else:
                # A sync function runs in a thread; past its timeout it is abandoned, not stopped.
                output = await asyncio.wait_for(asyncio.to_thread(tool.function, **arguments), tool.timeout_s)
        except asyncio.TimeoutError:
            return result({"error": f"{call.name} took longer than {tool.timeout_s:g} s"}, False)
        except Exception as exc:  # the tool's own failure: the LM hears of it, the call goes on
            log.warning("tool.failed", name=call.name, error=repr(exc))
            return result({"error": f"{call.name} failed: {exc}"}, False)
        return result(output, True)


def load_toolbox(module: str | None, builtin: bool, timeout_s: float, filler_ms: float) -> Toolbox | None:
    """The server's tools: the built-in ones unless turned off, then those of `module`; None if
    there are none."""
    from tools.builtin import BUILTIN

    tools = [tool_from_function(f, timeout_s) for f in BUILTIN] if builtin else []
    if module:
        tools += module_tools(module, timeout_s)
    return Toolbox(tools, filler_ms) if tools else None
