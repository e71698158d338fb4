"""How fast the embedded LM runs in each weight format of `--lm-weights`, and what it answers.

    python -m bench.experiments.lm_weights            # prints one JSON object

Each format gets one llama.cpp context on one thread, as the reply LM has in a call on two cores:
the prompt's time per token over six prompts of ~70 tokens (no cache), the decode's time per token
over 40 tokens, and its greedy replies to five questions, to read beside the shipped file's.
"""

from __future__ import annotations

import json
import statistics
import sys

from bench.machine import describe, machine

PROMPTS = [
    "I have been trying to plan a weekend trip with my family, and we cannot agree on whether to go to the "
    "mountains or to the seaside, because the children want to swim but my partner wants to hike. "
    "What would you suggest we do, given that the weather forecast says it might rain on Sunday?",
    "My old laptop has become very slow over the last few months, it takes ages to start and the fan is "
    "always loud, even when I only have a browser open with a couple of tabs. Is it worth repairing it, "
    "or should I buy a new one, and what should I look for if I do?",
    "Could you explain in simple words how a refrigerator keeps food cold, what the compressor does, and "
    "why the back of the fridge feels warm when you touch it on a summer afternoon in the kitchen?",
    "Our neighbours have a dog that barks every night from about eleven until two in the morning, and we "
    "have already asked them politely twice. What else can we do before we have to complain to the city "
    "council about the noise, and how should we start that conversation again?",
    "I want to start running in the mornings before work, but I have never really done any sport and I "
    "get out of breath very quickly. How should I begin, how often should I go, and how long will it take "
    "until I can run for half an hour without stopping?",
    "When I make bread at home the loaf always comes out flat and dense instead of tall and airy like the "
    "one from the bakery around the corner. I use normal flour, dry yeast, water and salt. What am I "
    "probably doing wrong, and what should I change next time I bake?",
]
QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Can you recommend a good book?",
    "Why is the sky blue?",
    "What should I cook for dinner tonight?",
]
SYSTEM = "You are a friendly voice assistant. Answer in one or two short sentences."
DECODE_TOKENS = 40


def _complete(server, prompt: str, tokens: int, ignore_eos: bool) -> dict:
    request = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "cache_prompt": False,
        "ignore_eos": ignore_eos,
    }
    return server.handle_chat_completions(request)


def measure(fmt: str) -> dict:
    import xllamacpp

    from models.llamacpp_lm import llama_params
    from profiles.embedded import smollm2_weights

    server = xllamacpp.Server(llama_params(smollm2_weights(fmt), 1, 1, 2048, False, "127.0.0.1", 0, 1))
    try:
        prompt_ms, decode_ms = [], []
        for prompt in PROMPTS:
            timings = _complete(server, prompt, DECODE_TOKENS, True)["timings"]
            prompt_ms.append(timings["prompt_ms"] / timings["prompt_n"])
            decode_ms.append(timings["predicted_ms"] / timings["predicted_n"])
        replies = [_complete(server, question, 48, False)["choices"][0]["message"]["content"] for question in QUESTIONS]
    finally:
        del server
    return {
        "prompt_ms_per_token": round(statistics.median(prompt_ms), 2),
        "decode_ms_per_token": round(statistics.median(decode_ms), 2),
        "replies": replies,
    }


def main() -> int:
    import structlog

    from config import LM_WEIGHTS

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the JSON

    info = machine()
    results = {fmt: measure(fmt) for fmt in LM_WEIGHTS}
    shipped = results["shipped"]
    for result in results.values():
        result["prompt_speed_vs_shipped"] = round(shipped["prompt_ms_per_token"] / result["prompt_ms_per_token"], 2)
        result["decode_speed_vs_shipped"] = round(shipped["decode_ms_per_token"] / result["decode_ms_per_token"], 2)
    json.dump({"machine": describe(info), "threads": 1, "formats": results}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
