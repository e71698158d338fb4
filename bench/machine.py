"""The machine a run was made on, so that two machines' figures can be compared: the CPU and the
instruction sets the engines use, the cores this process may run on, and the load before the run."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from runtime.procfs import usable_cores

# What makes the engines' kernels fast or slow: llama.cpp, ONNX Runtime and CTranslate2 pick their
# code paths by these.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        "flags": [flag for flag in FLAGS if flag in flags],
        "cores": usable_cores(),
        "load_1m": round(os.getloadavg()[0], 2),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def describe(info: dict[str, Any]) -> str:
    """One line, e.g. `AMD EPYC 7B12, AVX2 (no AVX-512), 2 cores, 23.4 GB, load 0.12 before the run`."""
    flags = info["flags"]
    vector = "AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2"
    extra = [flag.upper() for flag in ("avx512_vnni", "avx512_bf16", "amx_tile") if flag in flags]
    return (
        f"{info['cpu']}, {' '.join([vector, *extra])}, {info['cores']} cores, {info['memory_gb']} GB, "
        f"load {info['load_1m']} before the run"
    )


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere than Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
