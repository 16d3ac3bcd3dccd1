"""Checkpoint loading: safetensors (single file or sharded), both tensor namings, FP8 block
weights and MXFP4 experts.

Names are normalised to DeepSeek's official spelling (``embed.weight``, ``layers.N.attn.wq_a.weight``,
``layers.N.ffn.experts.E.w1.weight`` …). transformers' files (``model.layers.N.…``,
``model.embed_tokens.weight``, ``model.hc_head.hc_fn``, ``layers.N.attn.norm`` for kv_norm) and
its in-memory module names (``self_attn.q_a_proj`` …, merged ``experts.gate_up_proj``) are
mapped onto it. Missing or unexpected tensors fail with the list of names; ``mtp.*`` tensors
(the multi-token-prediction layer) load into a model built with it and are skipped and logged
otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from engine.model.deepseek_v4 import DeepseekV4
from engine.model.layers import Linear
from engine.model.moe import StackedExperts
from engine.model.sharding import Split

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


# ---- naming ---------------------------------------------------------------------------------
_EXACT = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
# transformers' module names → official leaf names (spec §2.4, applied in this order).
_PATTERNS = [
    (r"\.weight_scale_inv$", ".scale"),
    (r"^(layers\.\d+)\.attn\.norm\.", r"\1.attn.kv_norm."),
    (r"\.self_attn\.compressor\.indexer\.kv_proj\.", ".attn.indexer.compressor.wkv."),
    (r"\.self_attn\.compressor\.indexer\.gate_proj\.", ".attn.indexer.compressor.wgate."),
    (r"\.self_attn\.compressor\.indexer\.kv_norm\.", ".attn.indexer.compressor.norm."),
    (r"\.self_attn\.compressor\.indexer\.position_bias$", ".attn.indexer.compressor.ape"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.kv_proj\.", ".attn.compressor.wkv."),
    (r"\.self_attn\.compressor\.gate_proj\.", ".attn.compressor.wgate."),
    (r"\.self_attn\.compressor\.kv_norm\.", ".attn.compressor.norm."),
    (r"\.self_attn\.compressor\.position_bias$", ".attn.compressor.ape"),
    (r"\.self_attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.self_attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.self_attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.self_attn\.kv_proj\.", ".attn.wkv."),
    (r"\.self_attn\.kv_norm\.", ".attn.kv_norm."),
    (r"\.self_attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.self_attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.self_attn\.sinks$", ".attn.attn_sink"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
    (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
    (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
    (r"\.mlp\.", ".ffn."),
]
_MERGED_EXPERTS = re.compile(r"^(layers\.\d+)\.ffn\.experts\.(gate_up_proj|down_proj)$")


def official_name(name: str) -> str:
    n = name[len("model."):] if name.startswith("model.") else name
    n = _EXACT.get(n, n)
    for pat, rep in _PATTERNS:
        n = re.sub(pat, rep, n)
    return n


# ---- checkpoint files -----------------------------------------------------------------------
class CheckpointReader:
    """Lazy access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, model_dir: str):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {model_dir!r}")
        self._handles = {}
        self.where: dict[str, tuple[str, str]] = {}  # official name -> (file, original name)
        for fn in files:
            path = os.path.join(model_dir, fn)
            if not os.path.exists(path):
                raise CheckpointError(f"checkpoint shard {fn!r} listed in the index is missing")
            h = safe_open(path, framework="pt")
            self._handles[fn] = h
            for k in h.keys():
                self.where[official_name(k)] = (fn, k)

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        fn, orig = self.where[name]
        return self._handles[fn].get_tensor(orig)

    def get_slice(self, name: str):
        fn, orig = self.where[name]
        return self._handles[fn].get_slice(orig)


# ---- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    """Where an official tensor name goes in our module tree."""

    setter: Callable[[torch.Tensor], None] | None = None  # plain tensors
    linear: Linear | None = None  # weights (+ .scale when quantised)
    expert: tuple[StackedExperts, int, str] | None = None  # (stack, local index, w1|w2|w3)


def _param_setter(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def set_(t: torch.Tensor) -> None:
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"shape {tuple(t.shape)} does not match expected {tuple(param.shape)}")
        param.data.copy_(t.to(param.dtype))
    return set_


# Our module paths → official names, for the few places where the module tree is not spelled like
# the checkpoint (everything else — ``layers.N.attn.wq_a``, ``…compressor.ape``, norms — is the same).
_TREE_TO_OFFICIAL = [
    (r"^(embed|head)$", r"\1.weight"),  # bare parameters on the root
    (r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3"),
    (r"\.ffn\.gate_weight$", ".ffn.gate.weight"),
    (r"\.ffn\.gate_bias$", ".ffn.gate.bias"),
    (r"\.ffn\.tid2eid$", ".ffn.gate.tid2eid"),
    (r"\.ffn\.shared\.", ".ffn.shared_experts."),
]


def _tree_to_official(path: str) -> str:
    for pat, rep in _TREE_TO_OFFICIAL:
        path = re.sub(pat, rep, path)
    return path


def expected_tensors(model: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Every official tensor name ``model`` needs, mapped to where it goes, derived from the module
    tree: each ``Linear`` is one ``<path>.weight`` (plus an optional ``.scale``), each
    ``StackedExperts`` one ``<path>.<expert>.<w1|w2|w3>.weight`` per expert it holds, and every
    other parameter or persistent buffer its own path, renamed by ``_TREE_TO_OFFICIAL``.
    Non-persistent buffers (rotary tables, quantised copies) are not checkpoint tensors.
    ``prefix`` names a sub-module's place in the checkpoint (e.g. ``"mtp.0."``)."""
    t: dict[str, Target] = {}
    for path, mod in model.named_modules():
        full = prefix + path
        if isinstance(mod, Linear):
            t[_tree_to_official(full + ".weight")] = Target(linear=mod)
            continue
        if isinstance(mod, StackedExperts):
            for local, e in enumerate(mod.expert_ids):
                for w in StackedExperts.PARTS:
                    t[f"{full}.{e}.{w}.weight"] = Target(expert=(mod, local, w))
            continue
        dot = full + "." if full else ""
        for name, p in mod.named_parameters(recurse=False):
            t[_tree_to_official(dot + name)] = Target(setter=_param_setter(p))
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                t[_tree_to_official(dot + name)] = Target(setter=_param_setter(b))
    return t


# ---- loading --------------------------------------------------------------------------------
def _load_merged_experts(reader: CheckpointReader, names: set[str], model: DeepseekV4,
                         shard: Callable[[str], Split | None]) -> set[str]:
    """transformers' in-memory layout merges experts: gate_up_proj [E, 2I, D], down_proj [E, D, I].
    They stay merged: this rank's experts are read as one slice along E, cut to the rank's split
    of the intermediate, and copied into the stack. Returns the per-expert names they stand for."""
    done = set()
    for n in sorted(names):
        m = _MERGED_EXPERTS.match(n)
        if not m:
            continue
        names.discard(n)
        layer = int(m.group(1).split(".")[1])
        stack = model.layers[layer].ffn.experts
        ids = stack.expert_ids
        merged = reader.get_slice(n)
        if merged.get_shape()[0] < ids.stop:
            raise CheckpointError(f"{n}: {merged.get_shape()[0]} experts, the model needs {ids.stop}")
        block = merged[ids.start:ids.stop]
        parts = dict(zip(("w1", "w3"), block.chunk(2, dim=1))) if m.group(2) == "gate_up_proj" else {"w2": block}
        for part, t in parts.items():
            first = f"{m.group(1)}.ffn.experts.{ids.start}.{part}.weight"
            split = shard(first)
            if split is not None:  # the same intermediate split for every expert
                t = t.narrow(split.dim + 1, split.start, split.stop - split.start)
            if tuple(t.shape[1:]) != stack.part_shape(part):
                raise CheckpointError(f"{n}: expert shape {tuple(t.shape[1:])} does not match expected "
                                      f"{stack.part_shape(part)}")
            with torch.no_grad():
                stack.dense_part(part).copy_(t.to(stack.gate_up_dense.dtype))
            done |= {f"{m.group(1)}.ffn.experts.{e}.{part}.weight" for e in ids}
    return done


def load_weights(model: DeepseekV4, model_dir: str, keep_dense: bool = True,
                 shard: Callable[[str], Split | None] | None = None, fp8_activations: bool = False) -> dict:
    """Fill ``model`` from ``model_dir``. Returns a small report (counts, skipped names).

    ``keep_dense`` dequantises FP8/FP4 weights once at load (the torch path's dense matmuls);
    otherwise layers keep the stored tensors, which the GEMM kernels decode in registers.
    ``fp8_activations``: layers whose checkpoint weight is FP8 round their activations to FP8
    per 128 channels (``kernels.linear(act_quant=True)``), with either storage.
    ``shard(name)`` gives the part of each official tensor this rank holds (tensor parallel);
    by default the model's own ``Parallel.split_for``. Only that part is read from disk
    (safetensors slices), quantised tensors together with the matching scale rows/columns."""
    if shard is None:
        def shard(name: str) -> Split | None:
            return model.par.split_for(name, model.cfg)
    reader = CheckpointReader(model_dir)
    expected = expected_tensors(model)
    present = set(reader.names())
    # The MTP layer's tensors load only into a model built with it (speculative method "mtp").
    mtp = sorted(n for n in present if n.startswith("mtp.") and n not in expected
                 and n.removesuffix(".scale") + ".weight" not in expected)
    present -= set(mtp)
    if mtp:
        log.info("skipping %d multi-token-prediction tensors (mtp.*): not used without MTP drafting", len(mtp))
    merged = _load_merged_experts(reader, present, model, shard)
    scales = {n for n in present if n.endswith(".scale")}
    present -= scales
    # A rank under expert parallelism legitimately ignores other ranks' experts.
    present = {n for n in present if not _foreign_expert(n, model)}
    missing = sorted(set(expected) - present - set(merged))
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" …" if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" …" if len(unexpected) > 20 else ""))
        raise CheckpointError(f"checkpoint {model_dir!r} does not match the model config: " + "; ".join(parts))
    unused_scales = sorted(s for s in scales if s[: -len(".scale")] + ".weight" not in expected
                           and not _foreign_expert(s, model))
    if unused_scales:
        raise CheckpointError(f"unexpected tensors: scales without weights: {unused_scales[:20]}")

    fp8_block = model.cfg.fp8_block or (128, 128)
    n_quant = 0
    progress = _LoadProgress(model_dir, len(expected))
    for name, target in expected.items():
        progress.step()
        try:
            if name in merged:
                continue
            if target.linear is not None or target.expert is not None:
                scale_name = name[: -len(".weight")] + ".scale"
                tensor, scale = _read_linear(reader, name, scale_name if scale_name in scales else None,
                                             shard(name), fp8_block)
            else:
                tensor, scale = _read(reader, name, shard(name)), None
            if target.linear is not None:
                _load_linear(target.linear, tensor, scale, keep_dense, name)
                target.linear.act_quant = fp8_activations and tensor.dtype == torch.float8_e4m3fn
                n_quant += scale is not None
            elif target.expert is not None:
                _load_expert(*target.expert, tensor, scale, keep_dense)
                n_quant += scale is not None
            else:
                target.setter(tensor)
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
    return {"tensors": len(expected), "quantized": n_quant, "skipped_mtp": len(mtp)}


class _LoadProgress:
    """One INFO line per quarter of the tensors, so a long load visibly advances."""

    def __init__(self, model_dir: str, total: int):
        self.model_dir, self.total, self.done, self.started = model_dir, total, 0, time.monotonic()
        self._next_mark = 1

    def step(self) -> None:
        self.done += 1
        if self.total and self.done * 4 >= self._next_mark * self.total:
            log.info("loading %s: %d%% of %d tensors (%.1f s)", self.model_dir, 25 * self._next_mark, self.total,
                     time.monotonic() - self.started)
            self._next_mark += 1


# ---- reading one rank's part ----------------------------------------------------------------
def _check_split(split: Split, shape: list[int], what: str = "") -> None:
    if split.dim >= len(shape) or not 0 <= split.start < split.stop <= shape[split.dim]:
        raise CheckpointError(f"cannot take {what}[{split.start}:{split.stop}] along dim {split.dim} "
                              f"of a tensor of shape {tuple(shape)}")


def _slice(sl, split: Split) -> torch.Tensor:
    """Read only ``split`` of a safetensors slice."""
    return sl[split.start:split.stop] if split.dim == 0 else sl[:, split.start:split.stop]


def _cut(t: torch.Tensor, split: Split | None) -> torch.Tensor:
    if split is None:
        return t
    _check_split(split, list(t.shape))
    return t.narrow(split.dim, split.start, split.stop - split.start)


def _read(reader: CheckpointReader, name: str, split: Split | None) -> torch.Tensor:
    if split is None:
        return reader.get(name)
    sl = reader.get_slice(name)
    _check_split(split, sl.get_shape())
    return _slice(sl, split)


def _read_linear(reader: CheckpointReader, name: str, scale_name: str | None, split: Split | None,
                 fp8_block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight (and its scale) cut to ``split`` of the logical [out, in] shape.

    FP8: one scale per ``fp8_block`` tile, so a part must start on a block edge (or lie inside
    one block). MXFP4: rows split freely; columns pack two per byte with one scale per 32, so a
    column part must start and end on multiples of 32."""
    if split is None:
        return reader.get(name), (reader.get(scale_name) if scale_name else None)
    if scale_name is None:
        return _read(reader, name, split), None
    w_sl, s_sl = reader.get_slice(name), reader.get_slice(scale_name)
    kind = w_sl.get_dtype()
    if kind == "F8_E4M3":
        _check_split(split, w_sl.get_shape())
        block = fp8_block[split.dim]
        a, b = split.start, split.stop
        if a % block and a // block != (b - 1) // block:
            raise CheckpointError(
                f"tensor-parallel part [{a}:{b}) of dim {split.dim} does not start on an FP8 scale block "
                f"edge (block {block}); choose a tensor_parallel_size that splits this dimension into "
                f"multiples of {block}")
        scale_split = Split(split.dim, a // block, -(-b // block))
        return _slice(w_sl, split), _slice(s_sl, scale_split)
    if kind in ("I8", "U8"):  # packed e2m1 pairs, one e8m0 scale per 32 logical columns
        if split.dim == 0:
            _check_split(split, w_sl.get_shape())
            return _slice(w_sl, split), _slice(s_sl, split)
        logical_in = w_sl.get_shape()[1] * 2
        _check_split(split, [w_sl.get_shape()[0], logical_in])
        a, b = split.start, split.stop
        if a % 32 or (b % 32 and b != logical_in):
            raise CheckpointError(
                f"tensor-parallel column part [{a}:{b}) is not aligned to MXFP4's 32-column scale groups; "
                f"choose a tensor_parallel_size that splits the input dimension into multiples of 32")
        return (_slice(w_sl, Split(1, a // 2, b // 2)), _slice(s_sl, Split(1, a // 32, -(-b // 32))))
    raise CheckpointError(f"weight dtype {kind} with a .scale is not a supported quantised format")


_EXPERT = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.")


def _foreign_expert(name: str, model: DeepseekV4) -> bool:
    """An expert tensor that belongs to another expert-parallel rank."""
    m = _EXPERT.match(name)
    if not m or not model.layers:
        return False
    ffn = model.layers[0].ffn
    e = int(m.group(1))
    return e < model.cfg.n_routed_experts and not (ffn.expert_start <= e < ffn.expert_end)


def _quant_format(w: torch.Tensor) -> tuple[str, tuple[int, int]]:
    """(format, logical [out, in] shape) of a quantised weight tensor."""
    if w.dtype == torch.float8_e4m3fn:
        return "fp8", tuple(w.shape)
    if w.dtype in (torch.int8, torch.uint8):
        return "fp4", (w.shape[0], w.shape[1] * 2)
    raise CheckpointError(f"weight dtype {w.dtype} with a .scale is not a supported quantised format")


def _load_expert(stack: StackedExperts, local: int, part: str, w: torch.Tensor, scale: torch.Tensor | None,
                 keep_dense: bool) -> None:
    want = stack.part_shape(part)
    if scale is None:
        if w.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8):
            raise CheckpointError(f"quantised weight ({w.dtype}) has no .scale tensor")
        if tuple(w.shape) != want:
            raise CheckpointError(f"shape {tuple(w.shape)} does not match expected {want}")
        stack.set_dense(part, local, w)
        return
    fmt, logical = _quant_format(w)
    if logical != want:
        raise CheckpointError(f"shape {logical} does not match expected {want}")
    if keep_dense:
        from kernels.quant import fp8_block_dequantize, mxfp4_dequantize

        deq = fp8_block_dequantize if fmt == "fp8" else mxfp4_dequantize
        stack.set_dense(part, local, deq(w, scale, stack.gate_up_dense.dtype))
    else:
        stack.set_quantized(part, local, w, scale, fmt)


def _load_linear(lin: Linear, w: torch.Tensor, scale: torch.Tensor | None, keep_dense: bool, name: str) -> None:
    if scale is None:
        if w.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8):
            raise CheckpointError(f"quantised weight ({w.dtype}) has no .scale tensor")
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            raise CheckpointError(f"shape {tuple(w.shape)} does not match expected {(lin.out_features, lin.in_features)}")
        lin.dense.data = w.to(lin.dense.dtype)
        return
    fmt, logical = _quant_format(w)
    if logical != (lin.out_features, lin.in_features):
        raise CheckpointError(f"shape {logical} does not match expected {(lin.out_features, lin.in_features)}")
    lin.set_quantized(w, scale, fmt, keep_dense)
