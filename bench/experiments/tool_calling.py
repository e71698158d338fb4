"""Can the embedded LM call tools? Asks SmolLM2-135M (llama.cpp, its own chat template with the
tools rendered by llama.cpp's Jinja support) questions that want a tool and counts the replies that
are a call of the right function with arguments that parse; and checks what the rule that stands in
for it routes.

    python -m bench.experiments.tool_calling              # prints one JSON object

The answer decides whether the embedded profile offers tools to its LM (`calls_tools`) or routes
the questions it knows with the rule (tools/rules.py).
"""

from __future__ import annotations

import json
import sys
import time

QUESTIONS = [
    ("What time is it right now?", "current_time"),
    ("Can you tell me the time?", "current_time"),
    ("What day is it today?", "current_time"),
    ("What's 17 times 23?", "calculate"),
    ("How much is 15 percent of 80?", "calculate"),
    ("How many kilometers are in 5 miles?", "convert_units"),
]
SYSTEM = "You are a helpful voice assistant. Call a function when it helps."


def main() -> int:
    import xllamacpp

    from profiles.embedded import smollm2_gguf
    from tools.rules import route
    from tools.toolbox import load_toolbox

    params = xllamacpp.CommonParams()
    params.model.path = str(smollm2_gguf())
    params.n_parallel, params.n_ctx = 1, 4096
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    params.n_threads_http, params.hostnames, params.port, params.verbosity = 1, ["127.0.0.1"], 0, -1
    params.use_jinja = True
    server = xllamacpp.Server(params)
    schemas = load_toolbox(None, True, 5, 700).schemas()  # type: ignore[union-attr]
    rows = []
    for question, wanted in QUESTIONS:
        request = {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "tools": schemas,
            "max_tokens": 80,
            "temperature": 0.0,
        }
        started = time.perf_counter()
        answer = server.handle_chat_completions(request)
        message = (answer.get("choices") or [{}])[0].get("message") or {}
        calls = message.get("tool_calls") or []
        valid = False
        for call in calls:
            try:
                json.loads(call["function"]["arguments"] or "{}")
                valid = valid or call["function"]["name"] == wanted
            except (KeyError, ValueError):
                pass
        routed = route(question)
        rows.append(
            {
                "question": question,
                "wanted": wanted,
                "lm_calls": [c.get("function", {}).get("name") for c in calls],
                "lm_valid_call": valid,
                "lm_said": (message.get("content") or "")[:120],
                "rule_routes": routed.name if routed else None,
                "ms": round(1000 * (time.perf_counter() - started)),
            }
        )
    summary = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp, Jinja chat template, greedy)",
        "lm_valid_calls": sum(r["lm_valid_call"] for r in rows),
        "rule_routed_right": sum(r["rule_routes"] == r["wanted"] for r in rows),
        "questions": len(rows),
        "rows": rows,
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
