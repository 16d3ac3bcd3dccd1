"""The embedded default model used when no ``--model`` / ``LLM(model=None)`` is given.

If the package ships a trained demo checkpoint (``engine/assets/demo``), that is it. Otherwise a
tiny random V4 checkpoint is made locally (``dsv4 make-tiny`` with seed 0) once and cached under
``$DSV4_CACHE_DIR`` (default ``~/.cache/dsv4``). Nothing is downloaded.
"""
from __future__ import annotations

import os

DEMO_DIR = os.path.join(os.path.dirname(__file__), "assets", "demo")
TINY_VERSION = "tiny-v1-seed0"


def cache_root() -> str:
    return os.environ.get("DSV4_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4")


def default_model_dir() -> str:
    if os.path.exists(os.path.join(DEMO_DIR, "config.json")):
        return DEMO_DIR
    target = os.path.join(cache_root(), TINY_VERSION)
    if not os.path.exists(os.path.join(target, "config.json")):
        from engine.tiny.make_tiny import make_tiny

        tmp = f"{target}.tmp{os.getpid()}"
        make_tiny(tmp, seed=0)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target
