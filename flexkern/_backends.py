"""Import the optional fast backends; each registers its ops with flexkern.ops.backend.

A backend that cannot load (no triton, no built extension) only leaves the reference in place."""
from __future__ import annotations

import importlib
import warnings

_OPTIONAL = ("flexkern.triton", "flexkern.cuda")


def load_backends() -> dict[str, str]:
    """Try each optional backend; returns {module: "ok" or the reason it is unavailable}."""
    status = {}
    for name in _OPTIONAL:
        try:
            importlib.import_module(name)
            status[name] = "ok"
        except ImportError as exc:
            status[name] = f"unavailable: {exc}"
        except Exception as exc:  # a broken backend must not break the package
            warnings.warn(f"flexkern backend {name} failed to load: {exc!r}")
            status[name] = f"failed: {exc!r}"
    return status
