import os

import pytest
import torch

# One intra-op thread: tiny matrices gain nothing from two, and on a busy 2-core box
# OpenMP spin-waits make every op orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The official-layout tiny checkpoint `dsv4 make-tiny` writes (seed 0)."""
    from engine.tiny.make_tiny import make_tiny

    d = tmp_path_factory.mktemp("tiny")
    make_tiny(str(d), seed=0)
    return str(d)


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_dir, tmp_path_factory):
    """The same weights dequantised for transformers."""
    from hf_reference import official_to_hf_dir

    return official_to_hf_dir(tiny_dir, str(tmp_path_factory.mktemp("tiny_hf")))


@pytest.fixture(scope="session")
def hf_saved_dirs(tmp_path_factory):
    """Checkpoints written by transformers' save_pretrained for configs A and B."""
    from hf_reference import build_hf_model

    dirs = {}
    for name in ("A", "B"):
        d = str(tmp_path_factory.mktemp(f"hf_{name}"))
        build_hf_model(name, seed=3).save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture(autouse=True)
def _twin_backend(monkeypatch):
    """In-process tests run the kernels' torch twins whatever DSV4_KERNELS the caller exported;
    the interpreted parity scripts set it in their own subprocess's environment."""
    from kernels.policy import BACKEND_ENV

    monkeypatch.delenv(BACKEND_ENV, raising=False)
