"""The house rules, read from the source: imports point down only, every task has an owner, and the
README's protocol is the code's."""

from __future__ import annotations

import ast
import re

import pytest

from realtime.events import CLIENT_EVENTS, SERVER_EVENTS
from tests.import_graph import ROOT, graph, modules, violations

pytestmark = pytest.mark.unit


def test_imports_point_down_only_and_never_in_a_circle():
    edges = graph()
    assert len(edges) > 50  # the reader found the project
    assert violations(edges) == []


def test_the_import_check_catches_an_upward_import_and_a_circle():
    edges = {"models.a": {"controller.b"}, "controller.b": {"models.a"}, "vad.x": {"realtime.y"}, "realtime.y": set()}
    broken = violations(edges)
    assert "models.a -> controller.b: a higher room" in broken
    assert "vad.x -> realtime.y: a same-layer room" in broken
    assert "circle: controller.b -> models.a" in broken


def _bare_task_starts(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if node.func.attr == "ensure_future" or (
                node.func.attr == "create_task"
                and (
                    (isinstance(owner, ast.Name) and owner.id in ("asyncio", "loop"))
                    or (isinstance(owner, ast.Call) and getattr(owner.func, "attr", "") in ("get_running_loop", "get_event_loop"))
                )
            ):
                lines.append(node.lineno)
    return lines


def test_every_task_is_started_by_a_task_owner():
    bare = {
        name: lines
        for name, path in modules().items()
        if not name.startswith("tests") and name != "runtime.tasks"
        if (lines := _bare_task_starts(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert bare == {}
    assert _bare_task_starts(ast.parse("import asyncio\nasyncio.create_task(f())"))  # the check can fail


def _readme_events() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Events", 1)[1].split("\n#", 1)[0]
    tables: dict[str, set[str]] = {}
    current = None
    for line in section.splitlines():
        header = re.match(r"\|\s*(client|server) event\s*\|", line)
        if header:
            current = tables.setdefault(header.group(1), set())
        elif current is not None and (row := re.match(r"\|\s*`([a-z_.]+)`", line)):
            current.add(row.group(1))
        elif not line.startswith("|"):
            current = None
    return tables


def test_the_readme_lists_exactly_the_events_the_code_has():
    listed = _readme_events()
    assert listed.get("client") == set(CLIENT_EVENTS)
    assert listed.get("server") == set(SERVER_EVENTS)


MAX_FUNCTION_LINES = 60


def _long_functions(tree: ast.AST) -> list[str]:
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_outside_the_tests_is_over_60_lines():
    long = {
        name: found
        for name, path in modules().items()
        if not name.startswith("tests")
        if (found := _long_functions(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert long == {}
    assert _long_functions(ast.parse("def f():\n" + "    x = 1\n" * 61))  # the check can fail
