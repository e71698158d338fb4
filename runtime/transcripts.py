"""A transcript as stored: JSON lines, one record each, in the order written; folded into the
session's turns the same way wherever they were stored (a worker's file, the shared store)."""

from __future__ import annotations

import json
from typing import Any, Iterable

import structlog

log = structlog.get_logger()


def fold_transcript(lines: Iterable[str], session_id: str) -> list[dict[str, Any]]:
    """A session's turns from its records in the order written (JSON lines): deleted items
    dropped, a later text for a turn in place of the earlier one."""
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a crash mid-write: the turns before it still count
            if line.strip():
                log.warning("transcript.torn_line", session_id=session_id, chars=len(line))
            continue
        if record.get("deleted"):  # the item left the history
            records = [r for r in records if r.get("item_id") != record.get("item_id")]
            continue
        if record.pop("replaces", False):  # a later text for a turn already written
            earlier = [i for i, r in enumerate(records) if (r.get("item_id"), r.get("role")) == (record.get("item_id"), record.get("role"))]
            if earlier:
                records[earlier[-1]] = record
                continue
        records.append(record)
    return records
