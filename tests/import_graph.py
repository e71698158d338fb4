"""The project's import graph, read from the source with `ast` (nothing is imported).

    python tests/import_graph.py          # rooms, what each imports, and every rule broken

Rooms sit in layers; a module may import its own room and the rooms of lower layers only, so a
lower room never reaches a higher one and rooms of one layer stay apart. Modules must not import
each other in a circle, whether at import time or inside a function.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. `runtime` imports nothing of ours.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("runtime",),
    ("config",),
    ("vad", "realtime"),
    ("streaming_tokenizer", "models", "turns"),
    ("tools",),
    ("context",),
    ("controller",),
    ("profiles",),
    ("testkit",),
    ("run_server", "run_lm_server", "bench"),
    ("tests",),
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project: dotted name -> file."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in RANK and parts[0] not in {p.stem for p in root.glob("*.py")}:
            continue  # .venv, build folders and the like
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for imported in names:
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    if candidate != name:
                        targets.add(candidate)
                    break
    return targets


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports(path, name, known) for name, path in found.items()}


def room(module: str) -> str:
    return module.split(".")[0]


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import against the layers, and every circle of modules."""
    broken = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = room(source), room(target)
            if a == b:
                continue
            if a not in RANK or b not in RANK:
                broken.append(f"{source} -> {target}: a room outside the layers")
            elif RANK[b] >= RANK[a]:
                where = "a higher" if RANK[b] > RANK[a] else "a same-layer"
                broken.append(f"{source} -> {target}: {where} room")
    broken += [f"circle: {' -> '.join(c)}" for c in cycles(edges)]
    return broken


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def report(root: Path = ROOT) -> str:
    edges = graph(root)
    by_room: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for source, targets in edges.items():
        for target in targets:
            if room(source) != room(target):
                by_room[room(source)][room(target)] += 1
    lines = ["room -> rooms it imports (module imports)"]
    for source in sorted(by_room, key=lambda r: (RANK.get(r, -1), r)):
        targets = by_room[source]
        listed = ", ".join(f"{t} ({n})" for t, n in sorted(targets.items(), key=lambda x: (RANK.get(x[0], -1), x[0])))
        lines.append(f"  {source}: {listed}")
    broken = violations(edges)
    lines.append(f"rules broken: {len(broken)}")
    lines += [f"  {line}" for line in broken]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
