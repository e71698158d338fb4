"""The harness's outputs: per-turn JSON, a Markdown summary per concurrency level, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CLIENT_METRICS = ("client_v2v_ms", "bargein_stop_ms", "user_wer", "reply_wer")
SERVER_METRICS = ("endpoint_ms", "asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms")


def values(rows: list[dict[str, Any]], metric: str) -> list[float]:
    found = [r.get(metric, r["server"].get(metric)) for r in rows]
    return [float(v) for v in found if v is not None]


def stats(numbers: list[float]) -> dict[str, float]:
    if not numbers:
        return {}
    return {
        "n": len(numbers),
        **{f"p{q}": round(float(np.percentile(numbers, q)), 1) for q in (50, 90, 95)},
        "max": round(max(numbers), 1),
    }


def summarize(by_level: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """For each number of simultaneous sessions: the statistics of every metric, and the counts."""
    out: dict[int, dict[str, Any]] = {}
    for level, run in by_level.items():
        rows = run["turns"]
        out[level] = {
            "metrics": {m: stats(values(rows, m)) for m in CLIENT_METRICS + SERVER_METRICS},
            "false_starts": sum(r["false_start"] for r in rows),
            "false_cutoffs": sum(r["false_cutoff"] for r in rows),
            "split_turns": sum(r.get("split_turn", False) for r in rows),
            "underruns": run["underruns"],
            "self_interruptions": run.get("self_interruptions", 0),
            "replies_heard": replies_heard(rows),
            "scenarios": by_scenario(rows),
            **{k: run[k] for k in ("calls", "own_stops", "event_stalls", "network", "impairment", "room", "cpu_percent_per_session", "rss_mb", "cpu_by_stage") if k in run},
        }
    return out


def replies_heard(rows: list[dict[str, Any]]) -> str:
    """Of the turns that wait for a reply (they have a timeline), those whose reply was heard."""
    waiting = [r for r in rows if r.get("timeline")]
    return f"{sum(r['client_v2v_ms'] is not None for r in waiting)}/{len(waiting)}"


def by_scenario(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: turns, false starts, false cut-offs, split turns, replies that went on under a
    backchannel (of those spoken over), client_v2v p50 and bargein_stop_ms p95."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        v2v, stop = stats(values(mine, "client_v2v_ms")), stats(values(mine, "bargein_stop_ms"))
        spoken_over = [r["reply_continued"] for r in mine if r.get("reply_continued") is not None]
        out[name] = {
            "turns": len(mine),
            "false_starts": sum(r["false_start"] for r in mine),
            "false_cutoffs": sum(r["false_cutoff"] for r in mine),
            "split_turns": sum(r.get("split_turn", False) for r in mine),
            "replies_continued": f"{sum(spoken_over)}/{len(spoken_over)}" if spoken_over else "",
            "client_v2v_p50": v2v["p50"] if v2v else None,
            "bargein_stop_p95": stop["p95"] if stop else None,
        }
    return out


def markdown(summary: dict[int, dict[str, Any]]) -> str:
    lines = []
    for level, block in summary.items():
        lines += [f"### {level} simultaneous session(s)", "", "| metric | n | p50 | p90 | p95 | max |", "|---|---|---|---|---|---|"]
        for metric, s in block["metrics"].items():
            if s:
                lines.append(f"| {metric} | {s['n']} | {s['p50']} | {s['p90']} | {s['p95']} | {s['max']} |")
        calls = block.get("calls", {})
        extra = f"calls offered {calls['offered']}, refused {calls['refused']}; " if calls.get("refused") else ""
        extra += (
            f"false starts {block['false_starts']}, false cut-offs {block['false_cutoffs']}, "
            f"split turns {block['split_turns']}, replies heard {block['replies_heard']}, output underruns {block['underruns']}"
        )
        extra += f", self-interruptions {block['self_interruptions']}"
        if "room" in block:
            extra += f" (speakerphone: {block['room']})"
        if "event_stalls" in block:
            extra += f", event stalls over 1 s {block['event_stalls']}"
        if "impairment" in block:
            net = block["network"]
            sent = sum(d["sent"] + d["lost"] + d["too_big"] for d in net.values())
            lost = sum(d["lost"] for d in net.values())
            extra += (
                f"; network {block['impairment']}: {lost}/{sent} datagrams lost, "
                f"{sum(d['too_big'] for d in net.values())} over the MTU, largest {max(d['largest'] for d in net.values())} bytes"
            )
        if "cpu_percent_per_session" in block:
            extra += f", server CPU {block['cpu_percent_per_session']} % per session, RSS {block['rss_mb']} MB"
        lines += ["", extra, ""]
        if "cpu_by_stage" in block:
            lines += [stage_cpu_line(block["cpu_by_stage"]), ""]
        if len(block["scenarios"]) > 1:
            lines += [
                "| scenario | turns | false starts | false cut-offs | split turns | replies continued | client_v2v p50 | bargein_stop p95 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, s in block["scenarios"].items():
                cells = (s["turns"], s["false_starts"], s["false_cutoffs"], s["split_turns"], s["replies_continued"], s["client_v2v_p50"], s["bargein_stop_p95"])
                lines.append(f"| {name} | " + " | ".join("" if c is None else str(c) for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


def stage_cpu_line(cpu: dict[str, dict[str, float]]) -> str:
    """Where the server's CPU went, per stage: seconds per answered turn and share of one core."""
    parts = [f"{stage} {v['s_per_turn']} s/turn ({v['percent_of_core']} %)" for stage, v in cpu.items()]
    return "server CPU by stage (per answered turn, % of one core over the run): " + ", ".join(parts)


def plots(by_level: dict[int, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for level, run in by_level.items():
        v2v = sorted(values(run["turns"], "client_v2v_ms"))
        if v2v:
            ax.step(v2v, np.arange(1, len(v2v) + 1) / len(v2v), where="post", label=f"N={level}")
    ax.set_xlabel("client_v2v_ms")
    ax.set_ylabel("fraction of turns")
    ax.set_title("End of speech to first agent audio")
    ax.legend()
    written.append(_save(fig, out / "latency_cdf.png"))

    first = next(iter(by_level.values()))["turns"]
    staged = [r for r in first if r["server"].get("server_v2v_ms") is not None]
    if staged:
        fig, ax = plt.subplots(figsize=(7, 4))
        bottom = np.zeros(len(staged))
        for stage in ("endpoint_ms", "asr_ms", "lm_ttft_ms", "tts_first_audio_ms"):
            heights = np.array([float(r["server"].get(stage) or 0) for r in staged])
            ax.bar(range(len(staged)), heights, bottom=bottom, label=stage)
            bottom += heights
        ax.plot(range(len(staged)), [r["client_v2v_ms"] or 0 for r in staged], "k.", label="client_v2v_ms")
        ax.set_xlabel("turn")
        ax.set_ylabel("ms")
        ax.set_title("Stages per turn (each from its own start; overlap is speculation)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "stages.png"))

    conversation = [r for r in first if r["session"] == 0 and r["scenario"] == first[0]["scenario"] and r["timeline"]]
    if conversation:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        for r in conversation:
            t = r["timeline"]
            ax.barh(1, t["speech_end"] - t["clip_start"], left=t["clip_start"], color="tab:blue")
            if "reply_start" in t:
                ax.axvline(t["reply_start"], color="tab:orange")
            ax.text(t["clip_start"], 1.45, r["text"][:30], fontsize=7)
        ax.set_yticks([1], ["user speech"])
        ax.set_xlabel("seconds from call start (orange: first agent audio)")
        ax.set_title(f"Conversation timeline: {first[0]['scenario']}")
        written.append(_save(fig, out / "timeline.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(by_level: dict[int, dict[str, Any]], out: Path, machine: dict[str, Any] | None = None) -> str:
    """Write the run's files under `out`; returns the summary's Markdown. `machine`: what it ran on
    (bench/machine.py), the first line of the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "turns.json").write_text(json.dumps(by_level, indent=2, default=float))
    summary = summarize(by_level)
    (out / "summary.json").write_text(json.dumps({"machine": machine, "levels": summary}, indent=2))
    text = markdown(summary)
    if machine:
        from bench.machine import describe

        text = f"Machine: {describe(machine)}\n\n{text}"
    (out / "summary.md").write_text(text + "\n")
    plots(by_level, out)
    return text
