"""SmolLM2's shipped GGUF re-encoded for speed: the same model, every matrix within one rounding
step of the shipped values, loaded by llama.cpp and answering; made once and reused."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from config import LM_WEIGHTS
from models.base import Message
from models.gguf_reencode import FILE_TYPE_KEY, WeightFormat, reencode_gguf, reencoded_copy
from models.llamacpp_lm import LlamaCppLM
from profiles.embedded import smollm2_gguf
from runtime.workers import ModelWorker

pytestmark = pytest.mark.models

BLOCK = 32  # values per block in Q4_0, Q4_1 and Q8_0
HALF_STEPS = {WeightFormat.Q4_0: 8, WeightFormat.Q8_0: 127}  # a block's largest value / its step


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory) -> dict[WeightFormat, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    made = {}
    for fmt in HALF_STEPS:
        made[fmt] = folder / f"{fmt.value}.gguf"
        reencode_gguf(smollm2_gguf(), made[fmt], fmt)
    return made


def _fields(reader: GGUFReader) -> dict[str, object]:
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize("fmt", list(HALF_STEPS))
def test_every_4_bit_matrix_is_within_a_step_of_the_shipped_values_and_the_rest_is_untouched(reencoded, fmt):
    shipped, made = GGUFReader(smollm2_gguf()), GGUFReader(reencoded[fmt])
    before, after = _fields(shipped), _fields(made)
    assert before.pop(FILE_TYPE_KEY) == 3 and after.pop(FILE_TYPE_KEY) == fmt.file_type  # MOSTLY_Q4_1 before
    assert before == after  # the tokenizer, the chat template, the architecture
    assert [t.name for t in shipped.tensors] == [t.name for t in made.tensors]
    changed = 0
    for old, new in zip(shipped.tensors, made.tensors):
        assert list(old.shape) == list(new.shape), old.name
        if old.tensor_type != GGMLQuantizationType.Q4_1:
            assert new.tensor_type == old.tensor_type and np.array_equal(old.data, new.data), old.name
            continue
        changed += 1
        assert new.tensor_type == fmt.ggml_type, old.name
        want = dequantize(old.data, old.tensor_type).astype(np.float32).reshape(-1, BLOCK)
        got = dequantize(new.data, new.tensor_type).astype(np.float32).reshape(-1, BLOCK)
        step = np.abs(want).max(axis=1, keepdims=True) / HALF_STEPS[fmt]
        error = np.abs(got - want)
        # Round to nearest: half a step, one step where Q4_0 clips the side opposite its largest
        # value (its codes reach -8 but only +7), and the 16-bit scale's own rounding.
        assert (error <= step * 1.002 + 1e-7).all(), old.name
        assert error.mean() <= 0.3 * step.mean(), old.name
    assert changed == 210  # every matrix of the 30 blocks; the Q8_0 embedding stays


@pytest.mark.parametrize("fmt", list(HALF_STEPS))
def test_llama_cpp_loads_the_reencoded_file_and_it_still_knows_things(reencoded, fmt):
    worker = ModelWorker(f"reencoded-{fmt.value}", threads=2)
    lm = worker.submit(LlamaCppLM, reencoded[fmt], worker, 24, 0.0, 1, 1).result()

    async def ask() -> str:
        text = ""
        messages = [Message("system", "Answer in one short sentence."), Message("user", "What is the capital of France?")]
        async with aclosing(lm.stream(messages, 24)) as deltas:
            async for delta in deltas:
                text += delta
        return text

    try:
        reply = asyncio.run(ask())
    finally:
        worker.close()
        asyncio.run(lm.aclose())
    assert "Paris" in reply, reply


def test_the_copy_is_made_once_then_reused_and_the_shipped_file_needs_none(tmp_path):
    cache = tmp_path / "cache"
    assert reencoded_copy(smollm2_gguf(), cache, WeightFormat.SHIPPED) == smollm2_gguf()
    assert not cache.exists()
    made = reencoded_copy(smollm2_gguf(), cache, WeightFormat.Q4_0)
    stamp = made.stat().st_mtime_ns
    assert reencoded_copy(smollm2_gguf(), cache, WeightFormat.Q4_0) == made
    assert made.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [made.name]  # no partial file left behind


def test_the_setting_offers_exactly_the_formats_there_are():
    assert sorted(LM_WEIGHTS) == sorted(fmt.value for fmt in WeightFormat)


def test_a_source_that_cannot_be_read_leaves_no_file(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf().read_bytes()[:4096])  # the header, cut short
    cache = tmp_path / "cache"
    with pytest.raises(ValueError):
        reencoded_copy(broken, cache, WeightFormat.Q4_0)
    assert list(cache.iterdir()) == []
