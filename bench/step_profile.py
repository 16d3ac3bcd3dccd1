"""Where a decode step goes: device ops per layer, host syncs per step, host time outside the forward.

Measured from outside the engine through its public API (``LLM`` → ``EngineCore.step``):

- **device ops**: every aten op dispatched while one decode step runs, counted with a
  ``TorchDispatchMode`` (view ops excluded: they launch nothing); a fused kernel's custom op
  (``dsv4::*``) counts one.
- **kernel launches**: the same ops less allocations (``empty*``: no kernel), with each fused op
  replaced by what it launches: its Triton kernels (``JITFunction.run``, interpreted or not) and
  any aten op its launcher dispatches (output zero-fills and the like). "per layer" counts the ops
  dispatched inside the model's decoder blocks (forward hooks mark them) divided by the number
  of layers; "rest of forward" and "outside forward" are the remainder.
- **host syncs**: ops that make the host wait for the device — ``aten._local_scalar_dense``
  (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``), ``nonzero``/``unique``/``masked_select``
  and other data-dependent-size ops, device→host copies, and ``Tensor.tolist()`` (which on CPU
  does not dispatch, so it is counted by wrapping the method for the measured step).
- **host step time**: ``EngineCore.step`` at 256 running sequences with the model replaced by a
  stub that returns fixed logits (benchmark only), so what is left is schedule + batch build +
  sample + outputs (the runner's share — batch build, stub forward, sample — is timed apart).

    python bench/step_profile.py [--batch-sizes 1 32 128] [--host-seqs 256] [--host-steps 30]
        [--speculative-tokens K --speculative-method mtp]   (decode steps with drafting; the MTP
        layer's own ops are reported apart)
        [--kv-cache-dtype fp8] [--warmup-backend torch]   (prefill and warm-up steps on the torch twins, the measured step
        on the backend DSV4_KERNELS names: the Triton path interpreted on CPU takes minutes per
        prefill, and the measured decode step is the same either way)

The Triton path on CPU (device ops of the fused kernels, each launch one op):

    DSV4_KERNELS=triton TRITON_INTERPRET=1 python bench/step_profile.py --batch-sizes 4 32 --warmup-backend torch

A tiny 5-layer official-layout checkpoint (sliding, CSA, HCA, CSA, HCA) is made in a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

import torch
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from kernels import BACKEND_ENV  # noqa: E402

SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::masked_select",
    "aten::item", "aten::is_nonzero",
}


def _is_view(func) -> bool:
    return torch.Tag.view_copy not in func.tags and (
        func.is_view or any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns))


ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}


class StepCounter(TorchDispatchMode):
    """Counts dispatched aten ops and kernel launches by region, and host syncs (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.region = "outside"
        self.layer = -1  # the decoder block running (while region == "layers")
        self.ops: Counter = Counter()
        self.layer_ops: Counter = Counter()
        self.launches: Counter = Counter()
        self.layer_launches: Counter = Counter()
        self.in_triton = False  # a Triton kernel is running (the interpreter's own tensor work is not a launch)
        self.syncs: Counter = Counter()
        self.sync_regions: Counter = Counter()

    def count_launch(self) -> None:
        self.launches[self.region] += 1
        if self.region == "layers":
            self.layer_launches[self.layer] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS or self._is_device_to_host(func, args, kwargs):
            self.syncs[name] += 1
            self.sync_regions[self.region] += 1
        if not _is_view(func):
            self.ops[self.region] += 1
            if self.region == "layers":
                self.layer_ops[self.layer] += 1
            if name.startswith("dsv4::"):  # its implementation runs under a mode that sees its launches
                with _FusedOpLaunches(self):
                    return _maybe_get_opdef(name)._init_fn(*args, **kwargs)
            if name not in ALLOCATIONS:
                self.count_launch()
        return func(*args, **kwargs)

    @staticmethod
    def _is_device_to_host(func, args, kwargs) -> bool:
        if func._schema.name not in ("aten::_to_copy", "aten::copy_", "aten::to"):
            return False
        src = args[1] if func._schema.name == "aten::copy_" else args[0]
        dst_dev = kwargs.get("device")
        if func._schema.name == "aten::copy_":
            dst_dev = args[0].device
        return (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_dev is not None
                and torch.device(dst_dev).type == "cpu")


class _FusedOpLaunches(TorchDispatchMode):
    """Inside a fused op: the aten ops its launcher dispatches that launch a kernel."""

    def __init__(self, counter: StepCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        # The interpreter's own copies of a kernel's arguments happen inside run: not launches.
        if not self.counter.in_triton and not _is_view(func) and name not in ALLOCATIONS:
            self.counter.count_launch()
        return func(*args, **(kwargs or {}))


class _TritonLaunches:
    """Counts every Triton kernel launch (``fn[grid](...)`` calls ``run``) into ``counter``."""

    def __init__(self, counter: StepCounter):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.counter, self.classes = counter, (JITFunction, InterpretedFunction)
        self.saved = [cls.run for cls in self.classes]

    def __enter__(self):
        counter = self.counter

        def wrap(run):
            def counted(fn, *args, **kwargs):
                if kwargs.get("warmup"):
                    return run(fn, *args, **kwargs)
                counter.count_launch()
                counter.in_triton = True
                try:
                    return run(fn, *args, **kwargs)
                finally:
                    counter.in_triton = False
            return counted
        for cls, run in zip(self.classes, self.saved):
            cls.run = wrap(run)
        return self

    def __exit__(self, *exc):
        for cls, run in zip(self.classes, self.saved):
            cls.run = run


def _hook_regions(model: nn.Module, counter: StepCounter) -> list:
    """Forward hooks that tag ops as forward / layer while the model runs."""
    handles = []

    def enter(region):
        def pre(_m, _a, *rest):
            counter.region = region
        return pre

    def leave(region):
        def post(_m, _a, _o, *rest):
            counter.region = region
        return post

    handles.append(model.register_forward_pre_hook(enter("forward")))
    handles.append(model.register_forward_hook(leave("outside")))
    def enter_block(index):
        def pre(_m, _a, *rest):
            counter.region, counter.layer = "layers", index
        return pre

    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(enter_block(i)))
        handles.append(block.register_forward_hook(leave("forward")))
    for layer in getattr(model, "mtp", ()):  # MTP drafting: its passes are counted apart
        handles.append(layer.register_forward_pre_hook(enter("mtp")))
        handles.append(layer.register_forward_hook(leave("outside")))
        handles.append(_RegionWrap(model, "streams", counter))  # the target forward MTP steps call
    return handles


class _RegionWrap:
    """Tags ``obj.name(...)``'s ops as the forward (a method, not a module: no hooks), removable."""

    def __init__(self, obj, name: str, counter: "StepCounter"):
        self.obj, self.name = obj, name
        orig = getattr(obj, name)

        def wrapped(*args, **kwargs):
            counter.region = "forward"
            try:
                return orig(*args, **kwargs)
            finally:
                counter.region = "outside"
        setattr(obj, name, wrapped)

    def remove(self) -> None:
        delattr(self.obj, self.name)


class _TolistCounter:
    """``Tensor.tolist`` does not dispatch on CPU: count it by wrapping the method."""

    def __init__(self, counter: StepCounter):
        self.counter, self.orig = counter, torch.Tensor.tolist

    def __enter__(self):
        counter, orig = self.counter, self.orig

        def tolist(t):
            counter.syncs["Tensor.tolist"] += 1
            counter.sync_regions[counter.region] += 1
            return orig(t)
        torch.Tensor.tolist = tolist
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.orig


def make_model(out_dir: str) -> str:
    from engine.tiny.make_tiny import make_tiny

    make_tiny(out_dir, seed=0, num_layers=5, compress_ratios=(0, 4, 128, 4, 128))  # "by layer" follows this order
    return out_dir


def _start_decoding(llm: LLM, batch: int, prompt_len: int, vocab: int) -> None:
    """Add ``batch`` requests and step until every one of them is past its prefill."""
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i in range(batch):
        llm.engine.add_request(f"p{batch}-{i}", torch.randint(2, vocab, (prompt_len,), generator=g).tolist(), params)
    sched = llm.engine.scheduler
    for _ in range(10_000):
        llm.engine.step()
        if sched.num_waiting == 0 and all(r.num_output_tokens > 0 for r in sched.requests.values()):
            break


class _Backend:
    """Runs its block with ``DSV4_KERNELS`` set to ``backend`` (None: unchanged)."""

    def __init__(self, backend: str | None):
        self.backend, self.saved = backend, None

    def __enter__(self):
        self.saved = os.environ.get(BACKEND_ENV)
        if self.backend is not None:
            os.environ[BACKEND_ENV] = self.backend

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = self.saved


def profile_decode(model_dir: str, batch: int, prompt_len: int, spec: dict | None = None,
                   warmup_backend: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    llm = LLM(model_dir, max_num_seqs=max(batch, 1), max_num_batched_tokens=max(2048, batch),
              enable_prefix_cache=False, kv_cache_memory=512 * 1024 * 1024, kv_cache_dtype=kv_cache_dtype,
              **(spec or {}))
    model = llm.engine.runner.model
    with _Backend(warmup_backend):
        _start_decoding(llm, batch, prompt_len, llm.engine.model_config.vocab_size)
        for _ in range(3):  # warm decode steps
            llm.engine.step()
    counter = StepCounter()
    handles = _hook_regions(model, counter)
    try:
        with counter, _TolistCounter(counter), _TritonLaunches(counter):
            llm.engine.step()
    finally:
        for h in handles:
            h.remove()
    n_layers = len(model.layers)
    llm.shutdown()
    return {
        "batch": batch,
        "ops_per_layer": counter.ops["layers"] / n_layers,
        "ops_by_layer": [counter.layer_ops[i] for i in range(n_layers)],  # sliding, CSA, HCA, ... by ratio
        "launches_per_layer": counter.launches["layers"] / n_layers,
        "launches_by_layer": [counter.layer_launches[i] for i in range(n_layers)],
        "ops_rest_of_forward": counter.ops["forward"],
        "ops_outside_forward": counter.ops["outside"],
        "ops_mtp_layer": counter.ops["mtp"],  # every MTP pass of the step (catch-up + chain)
        "syncs_per_step": sum(counter.syncs.values()),
        "syncs_in_forward": counter.sync_regions["forward"] + counter.sync_regions["layers"],
        "sync_kinds": dict(counter.syncs),
    }


class FixedLogitsModel(nn.Module):
    """Benchmark-only stand-in for the model: fixed logits, no cache work, so a step times the
    host side alone. Token 1 + row index keeps the sampled ids varied but deterministic."""

    def __init__(self, real: nn.Module):
        super().__init__()
        self.cfg, self.dtype, self.layers = real.cfg, real.dtype, nn.ModuleList()
        self.logits = torch.zeros(1024, real.cfg.vocab_size)
        self.logits[torch.arange(1024), 2 + torch.arange(1024) % (real.cfg.vocab_size - 2)] = 1.0

    def forward(self, batch, cache) -> torch.Tensor:
        return torch.zeros(len(batch.logits_rows), 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]


def calibration_ms(repeats: int = 7) -> float:
    """Median time of a fixed pure-Python workload in this process: this box's speed differs by
    up to 2x between processes (the same code, minutes apart), so host times are reported beside it."""
    def work():
        d = {}
        for i in range(20000):
            d[i & 255] = d.get(i & 255, 0) + i
        return d
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def host_step_time(model_dir: str, seqs: int, steps: int) -> dict:
    llm = LLM(model_dir, max_num_seqs=seqs, max_num_batched_tokens=max(4096, seqs),
              enable_prefix_cache=False, kv_cache_memory=512 * 1024 * 1024)
    runner = llm.engine.runner
    runner.model = FixedLogitsModel(runner.model)
    _start_decoding(llm, seqs, 16, llm.engine.model_config.vocab_size)
    for _ in range(3):
        llm.engine.step()
    times, runner_times = [], []
    execute = runner.execute

    def timed_execute(*a, **k):  # the runner's share: batch build, stub forward, sample
        t0 = time.perf_counter()
        try:
            return execute(*a, **k)
        finally:
            runner_times.append(time.perf_counter() - t0)
    runner.execute = timed_execute
    for _ in range(steps):
        t = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - t)
    assert llm.engine.scheduler.num_running == seqs
    llm.shutdown()

    def median_ms(xs):
        return 1e3 * sorted(xs)[len(xs) // 2]
    return {"seqs": seqs, "steps": steps, "median_ms": median_ms(times), "mean_ms": 1e3 * sum(times) / len(times),
            "runner_median_ms": median_ms(runner_times[-steps:]), "calibration_ms": calibration_ms()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a tiny 5-layer one in a temp dir)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=200, help="prompt tokens (past one CSA/indexer top-k)")
    ap.add_argument("--host-seqs", type=int, default=256)
    ap.add_argument("--host-steps", type=int, default=30)
    ap.add_argument("--host-only", action="store_true", help="only the host step time (no op counting)")
    ap.add_argument("--speculative-tokens", type=int, default=0,
                    help="profile decode steps with drafting (verify chunks + the drafter's work)")
    ap.add_argument("--speculative-method", default="ngram", choices=("ngram", "mtp"))
    ap.add_argument("--warmup-backend", choices=("torch", "triton"), default=None,
                    help="kernel backend of the prefill and warm-up steps (default: the measured step's)")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(tmp)
        spec = dict(speculative_tokens=args.speculative_tokens, speculative_method=args.speculative_method,
                    speculative_max_batch=max(args.batch_sizes)) if args.speculative_tokens else None
        rows = [] if args.host_only else [profile_decode(model_dir, b, args.prompt_len, spec, args.warmup_backend,
                                                         args.kv_cache_dtype)
                                          for b in args.batch_sizes]
        host = host_step_time(model_dir, args.host_seqs, args.host_steps)
    if args.json:
        print(json.dumps({"decode": rows, "host": host}, indent=2))
        return
    print(f"{'batch':>5} | {'ops/layer':>9} | {'launches/layer':>14} | {'ops rest fwd':>12} | {'ops outside':>11} | "
          f"{'syncs/step':>10} | {'in forward':>10} | kinds")
    for r in rows:
        print(f"{r['batch']:>5} | {r['ops_per_layer']:>9.1f} | {r['launches_per_layer']:>14.1f} | "
              f"{r['ops_rest_of_forward']:>12} | {r['ops_outside_forward']:>11} | {r['syncs_per_step']:>10} | "
              f"{r['syncs_in_forward']:>10} | {r['sync_kinds']} | ops by layer {r['ops_by_layer']}, "
              f"launches by layer {r['launches_by_layer']}"
              + (f" | MTP layer ops {r['ops_mtp_layer']}" if r["ops_mtp_layer"] else ""))
    print(f"host step time at {host['seqs']} sequences (stub model, {host['steps']} steps): "
          f"median {host['median_ms']:.2f} ms, mean {host['mean_ms']:.2f} ms; of which the model runner "
          f"(batch build + stub forward + sample) median {host['runner_median_ms']:.2f} ms, the rest is the "
          f"scheduler/KV manager, detokenizer and outputs; calibration loop {host['calibration_ms']:.2f} ms "
          f"(this process's speed: compare runs by it)")


if __name__ == "__main__":
    main()
