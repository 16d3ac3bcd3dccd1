"""How a step's forward runs: eagerly, through ``torch.compile(fullgraph=True)``, or replayed
from CUDA graphs. Captured paths serve pure-decode steps (one shape per decode bucket and
context bound, built by ``BatchBuilder``); steps with prefill chunks run eagerly (their token
counts vary step to step)."""
from __future__ import annotations

from typing import Callable

import torch

from engine.worker.input_batch import ForwardBatch

StepFn = Callable[[ForwardBatch], torch.Tensor]


class EagerStep:
    captured = False

    def __init__(self, fn: StepFn):
        self.fn = fn

    def __call__(self, batch: ForwardBatch, decode: bool) -> torch.Tensor:
        return self.fn(batch)


class CompiledStep:
    """``torch.compile(fullgraph=True)`` of the decode forward: the proof that the step has no
    graph break (no host sync, no data-dependent shape) and, with Inductor, a fused step."""

    captured = True

    def __init__(self, fn: StepFn, backend: str = "inductor"):
        import torch._dynamo

        # One compiled graph per decode bucket and context bound.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        self.fn = fn
        # Inductor's locality reordering moves the window-ring / compressor-state index_put ahead
        # of the gather that reads the old rows; the mutation then cannot be done in place and
        # every ring and state buffer is cloned each step (cost grows with max_num_seqs: 4.7x
        # slower than eager at batch 1). Keeping program order lets it reinplace.
        options = {"reorder_for_locality": False} if backend == "inductor" else None
        self.compiled = torch.compile(
            fn, fullgraph=True, dynamic=False, backend=backend, options=options
        )

    def __call__(self, batch: ForwardBatch, decode: bool) -> torch.Tensor:
        return self.compiled(batch) if decode else self.fn(batch)


class CudaGraphStep:
    """Decode steps replayed from one CUDA graph per batch shape. The graph owns a static copy of
    the batch; a replay copies the new batch's tensors into it (same shapes by construction).
    Capturing runs the step once for warm-up on the real batch: a step only rewrites cache rows
    it does not read, so running it again (the replay) gives the same result."""

    captured = True

    def __init__(self, fn: StepFn):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, ForwardBatch, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, batch: ForwardBatch, decode: bool) -> torch.Tensor:
        if not decode:
            return self.fn(batch)
        key = batch.shape_key()
        entry = self.graphs.get(key)
        if entry is None:
            static = batch.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(static)
            self.pool = graph.pool()
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        static.copy_(batch)
        graph.replay()
        return out


def make_step(fn: StepFn, device: torch.device, compile: bool, enforce_eager: bool):
    """CUDA graphs on CUDA unless ``enforce_eager``; ``compile`` wraps the forward in
    ``torch.compile`` on any device (and takes precedence over graphs)."""
    if compile:
        return CompiledStep(fn)
    if device.type == "cuda" and not enforce_eager:
        return CudaGraphStep(fn)
    return EagerStep(fn)
