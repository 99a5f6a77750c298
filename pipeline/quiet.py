"""Library chatter off unless `flowsteer --verbose`: diffusers/transformers/huggingface_hub loading bars,
their info logs and advisory warnings (a tiny SD3 `train` printed 42 such lines of 75).

The CLI records the choice in the environment (FLOWSTEER_VERBOSE=0 or 1), so Ray actors and Ray Train
workers, which inherit it, follow the driver. `quiet_libraries()` is called wherever flowsteer loads a
model (teachers, students), in whatever process that is; it is cheap after the first call. Used as a
library (no CLI, the variable unset) flowsteer leaves the libraries' logging as the caller set it.
"""
from __future__ import annotations

import os
import warnings

VERBOSE_ENV = "FLOWSTEER_VERBOSE"
# Read by the libraries themselves at import (also in worker processes that never call quiet_libraries).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DIFFUSERS_NO_ADVISORY_WARNINGS": "1"}
NOISY_MODULES = r"(diffusers|transformers|huggingface_hub|peft|accelerate)(\.|$)"

_applied = False


def wants_quiet() -> bool:
    return os.environ.get(VERBOSE_ENV) == "0"


def set_verbose(verbose: bool) -> None:
    """Called once by the CLI: record the choice in the environment (inherited by workers) and apply it."""
    global _applied
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        warnings.filterwarnings("ignore", module=NOISY_MODULES)   # also the ones raised while importing them
    _applied = False


def quiet_libraries() -> None:
    """Unless verbose: no loading bars, only errors from the libraries' loggers, no warnings from their modules."""
    global _applied
    if _applied or not wants_quiet():
        return
    _applied = True
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    import importlib

    for library in ("diffusers", "transformers"):
        try:
            log = importlib.import_module(f"{library}.utils.logging")
        except ImportError:  # pragma: no cover - a dependency
            continue
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass
