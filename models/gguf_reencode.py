"""Re-encode a GGUF's 4-bit weights in another llama.cpp block format, once, ahead of loading.

SmolLM2's GGUF ships with its matrices in Q4_1. The prebuilt llama.cpp wheel is a generic AVX2
build that repacks Q4_0 (and not Q4_1) into interleaved blocks at load time, which takes the
prompt from ~5.9 to ~3.3 ms a token on one thread here: most of a reply's first-token time.
Q8_0 keeps the shipped values almost exactly (a rounding of 1/127 of each block's range) at
~3.7 ms a token, with 1.5 times the file."""

from __future__ import annotations

import os
import tempfile
import time
from enum import Enum
from pathlib import Path

import numpy as np
import structlog
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

log = structlog.get_logger()

FILE_TYPE_KEY = "general.file_type"
SHIPPED_TYPE = GGMLQuantizationType.Q4_1  # what the matrices of the GGUFs re-encoded here are stored in


class WeightFormat(Enum):
    """How the LM's matrices are stored: as shipped, or re-encoded into a format llama.cpp runs faster."""

    SHIPPED = "shipped"
    Q4_0 = "q4_0"
    Q8_0 = "q8_0"

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def file_type(self) -> LlamaFileType:
        return LlamaFileType[f"MOSTLY_{self.name}"]


def reencode_gguf(source: Path, target: Path, fmt: WeightFormat) -> None:
    """Write `source` to `target` with every Q4_1 tensor in `fmt` (dequantized, then quantized
    again) and everything else (metadata, the embedding, the norms) as it is. The file appears
    whole or not at all, so a second process starting at the same moment reads a complete one."""
    reader = GGUFReader(source)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    writer_path = Path(partial)
    try:
        writer = GGUFWriter(writer_path, reader.fields["general.architecture"].contents())
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":  # the writer puts these itself
                continue
            if name == FILE_TYPE_KEY:
                writer.add_file_type(fmt.file_type)
                continue
            kind = field.types[0]
            writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
        for tensor in reader.tensors:
            if tensor.tensor_type == SHIPPED_TYPE:
                values = dequantize(tensor.data, SHIPPED_TYPE).astype(np.float32)
                writer.add_tensor(tensor.name, quantize(values, fmt.ggml_type), raw_dtype=fmt.ggml_type)
            else:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        writer_path.chmod(0o644)  # mkstemp's file is private; the cache is not
        writer_path.replace(target)
    finally:
        writer_path.unlink(missing_ok=True)


def reencoded_copy(source: Path, cache: Path, fmt: WeightFormat) -> Path:
    """`source` in `fmt`, re-encoded into `cache` the first time it is asked for (~4 s here), then reused."""
    if fmt is WeightFormat.SHIPPED:
        return source
    target = cache / f"{source.stem}.as-{fmt.value}.gguf"
    if not target.exists():
        started = time.monotonic()
        cache.mkdir(parents=True, exist_ok=True)
        reencode_gguf(source, target, fmt)
        log.info("models.weights_reencoded", source=str(source), path=str(target), seconds=round(time.monotonic() - started, 2))
    return target

