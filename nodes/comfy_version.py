"""Refuse a ComfyUI older than the pack supports with one clear message instead of an ImportError trace.

Standard library only, and nothing is probed at import: the package entry point imports this before any
ComfyUI API, so that the check can run first.
"""

from __future__ import annotations

import importlib
import re

MINIMUM = (0, 3, 64)
TESTED = ("0.3.64", "0.33.0")


def _installed_version() -> str | None:
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return None  # a checkout too old to have comfyui_version.py, or something that is not ComfyUI


def has_v3_api() -> bool:
    """``comfy_api.latest`` (ComfyExtension, io) exists; a ComfyUI without it cannot call ``comfy_entrypoint``."""
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        return False
    return True


def _has_outer_sample_wrapper() -> bool:
    try:
        wrappers = importlib.import_module("comfy.patcher_extension").WrappersMP
    except (ImportError, AttributeError):
        return False
    return hasattr(wrappers, "OUTER_SAMPLE")


def unsupported_reason() -> str | None:
    """The message for the user when the running ComfyUI cannot host the pack, else None."""
    version = _installed_version()
    parsed = re.match(r"(\d+)\.(\d+)\.(\d+)", version or "")
    too_old = parsed is not None and tuple(int(part) for part in parsed.groups()) < MINIMUM
    missing = [
        name
        for name, present in (
            ("comfy_api.latest", has_v3_api()),
            ("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE", _has_outer_sample_wrapper()),
        )
        if not present
    ]
    if not too_old and not missing:
        return None
    found = version or "an unknown version"  # checkouts before comfyui_version.py
    if missing and not too_old:  # a fork or a broken install: the version alone does not explain it
        found += f" without {' and '.join(missing)}"
    minimum = ".".join(str(part) for part in MINIMUM)
    return f"comfyui-reuse needs ComfyUI >= {minimum} (tested on {' and '.join(TESTED)}); found {found}: update ComfyUI"


def require_supported_comfyui() -> None:
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)
