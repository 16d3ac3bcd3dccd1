"""``python -m demo.train_demo``: train the embedded demo model, a tiny DeepSeek-V4 that speaks V4's format.

Pipeline: seeded synthetic conversations (``demo.demo_data``) → a byte-level BPE trained on
them → our own ``DeepseekV4`` with its multi-token-prediction layer (``mtp.0.*``, spec §3.11)
trained from scratch (AdamW, warmup + cosine, loss on assistant tokens only) → an
official-layout checkpoint (FP8 block weights, MXFP4 routed experts, BF16 rest;
``engine.tiny.make_tiny.quantize_official``).

The loss is joint, as in DeepSeek-V3: the next-token loss plus ``mtp_loss_weight`` × the MTP
layer's loss on the token after next. The MTP layer reads position ``t``'s final streams of the
main model and the embedding of token ``t+1`` and is scored on token ``t+2`` where that is an
assistant token; its gradient reaches the main model too (through the streams and the shared
embedding and head).

``--mtp-head-from DIR`` trains only the MTP layer on top of an existing checkpoint: DIR's main
weights (and tokenizer) are loaded and frozen, the loss is the MTP loss alone, and the export
copies DIR's main tensors byte for byte next to the new ``mtp.0.*`` (how the shipped demo got
its MTP head without changing its outputs).

The last ``qat_fraction`` of the steps run quantisation-aware: the forward sees every weight
exactly as the exported checkpoint will store it (straight-through gradients to the fp32
master copy), and the weights are snapped to those values at the end, so the checkpoint
loaded from disk computes the same logits as the model that finished training.

Reproducible: the initial weights, the tokenizer and step ``i``'s batch depend only on the
seed; ``--minutes`` is turned into a step count after timing the first steps, and the run
prints and records that count so ``--steps`` repeats it exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.model.config import ModelConfig
from demo.demo_data import conversations, tokenize
from engine.worker.kv_cache import CacheShape, KVCache
from engine.model.loader import CheckpointReader, expected_tensors, load_weights
from engine.tiny.make_tiny import quantize_official, random_official_tensors, save_safetensors, tiny_config
from engine.model.deepseek_v4 import DeepseekV4
from kernels.quant import fp8_block_dequantize, fp8_block_quantize, mxfp4_dequantize, mxfp4_quantize
from engine.tiny.tokenizer_train import DEEPSEEK_SPECIAL_TOKENS, train_tokenizer
from engine.tokenizer import Tokenizer

# All three attention types (0 sliding, 4 CSA, 128 HCA) and both MoE kinds (2 hash layers).
DEMO_SHAPE = dict(
    hidden_size=128, num_layers=4, num_heads=4, head_dim=64, rope_dim=16, q_lora_rank=64,
    o_groups=2, o_lora_rank=32, compress_ratios=(0, 4, 128, 4), num_hash_layers=2,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, sliding_window=128,
    index_n_heads=8, index_head_dim=32, index_topk=32,
)


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    minutes: float = 20.0
    steps: int | None = None  # overrides minutes when given
    batch_size: int = 8
    lr: float = 5e-3
    min_lr_ratio: float = 0.05
    warmup: int = 30
    weight_decay: float = 0.01
    qat_fraction: float = 0.2
    mtp_loss_weight: float = 0.3  # weight of the MTP loss (token after next); DeepSeek-V3: 0.3, then 0.1
    vocab_size: int = 1536
    tokenizer_corpus: int = 3000  # conversations the BPE is trained on
    threads: int = 2
    shape: tuple[tuple[str, object], ...] = tuple(DEMO_SHAPE.items())

    def validate(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if self.steps is None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not 0 <= self.qat_fraction <= 1:
            raise ValueError(f"qat_fraction must be in [0, 1], got {self.qat_fraction!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.mtp_loss_weight >= 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight!r}")


@dataclass
class TrainResult:
    model: DeepseekV4
    cfg: ModelConfig
    tokenizer: Tokenizer
    steps: int
    final_loss: float  # mean next-token loss over the last 20 steps (nan when only the MTP head trained)
    losses: list[float]  # next-token loss per step (empty when only the MTP head trained)
    seconds: float
    mtp_losses: list[float]  # MTP loss (token after next) per step
    final_mtp_loss: float  # mean MTP loss over the last 20 steps


# ---- model ------------------------------------------------------------------------------------
def demo_config(tokenizer: Tokenizer, shape: dict | None = None) -> ModelConfig:
    vocab = -(-tokenizer.vocab_size // 64) * 64
    return tiny_config(vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       num_mtp_layers=1, **(shape or DEMO_SHAPE))


def official_parameters(model: DeepseekV4) -> dict[str, torch.Tensor]:
    """Official tensor name → the model's live tensor (parameter or ``tid2eid`` buffer)."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotaries.") or ".ffn.experts." in name:
            continue  # stacked experts: per-expert views below
        n = name.replace(".dense", ".weight").replace(".shared.", ".shared_experts.")
        n = n.replace("ffn.gate_weight", "ffn.gate.weight").replace("ffn.gate_bias", "ffn.gate.bias")
        n = n.replace("ffn.tid2eid", "ffn.gate.tid2eid").replace(".hc_attn.", ".hc_attn_")
        n = n.replace(".hc_ffn.", ".hc_ffn_").replace("hc_head.", "hc_head_")
        out[{"embed": "embed.weight", "head": "head.weight"}.get(n, n)] = tensor
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    blocks += [(f"mtp.{j}", m) for j, m in enumerate(model.mtp)]
    for prefix, block in blocks:
        experts = block.ffn.experts
        for local, e in enumerate(experts.expert_ids):
            for part in experts.PARTS:
                out[f"{prefix}.ffn.experts.{e}.{part}.weight"] = experts.dense_part(part)[local]
    want = set(expected_tensors(model))
    if set(out) != want:
        raise RuntimeError(f"name mapping out of date: extra {sorted(set(out) - want)[:5]}, "
                           f"missing {sorted(want - set(out))[:5]}")
    return out


def init_model(cfg: ModelConfig, seed: int) -> DeepseekV4:
    """A trainable fp32 model (with its MTP layer when ``cfg.num_mtp_layers``) with make-tiny's
    random init (distinct random hash experts per token, random sinks/ape/mHC). Frozen: the
    indexer (top-k selection passes it no gradient) and the routers' bias (it only shifts which
    experts are selected)."""
    model = DeepseekV4(cfg, torch.float32, mtp=cfg.num_mtp_layers > 0)
    params = official_parameters(model)
    with torch.no_grad():  # copy_: expert weights are views into their stacks
        for name, value in random_official_tensors(cfg, seed).items():
            if name in params:  # mtp.0.* only when the model has the layer
                params[name].copy_(value.to(params[name].dtype))
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." not in name and not name.endswith("gate_bias"))
    return model


def init_mtp_head(base_dir: str, seed: int) -> tuple[DeepseekV4, Tokenizer]:
    """``base_dir``'s model (weights as stored, fp32) and tokenizer, plus a freshly initialised MTP
    layer (make-tiny's random ``mtp.0.*`` draw): only the MTP layer trains, the rest is frozen."""
    base_cfg = ModelConfig.from_dir(base_dir)
    base = DeepseekV4(base_cfg, torch.float32)
    load_weights(base, base_dir)  # an existing mtp.* is skipped: the head is trained anew
    cfg = replace(base_cfg, num_mtp_layers=1)
    model = DeepseekV4(cfg, torch.float32, mtp=True)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not n.startswith("mtp.") for n in missing):
        raise RuntimeError(f"main weights did not map onto the MTP model: {unexpected[:5]} {missing[:5]}")
    params = official_parameters(model)
    with torch.no_grad():
        for name, value in random_official_tensors(cfg, seed).items():
            if name.startswith("mtp."):
                params[name].copy_(value.to(params[name].dtype))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp.") and ".indexer." not in name and not name.endswith("gate_bias"))
    return model, Tokenizer.from_dir(base_dir)


# ---- quantisation as exported -----------------------------------------------------------------
def storage_formats(model: DeepseekV4, prefix: str = "") -> dict[str, str]:
    """How each floating official tensor (whose name starts with ``prefix``) is stored: fp8, fp4,
    bf16 or f32."""
    state = {n: t.detach() for n, t in official_parameters(model).items() if n.startswith(prefix)}
    stored = quantize_official(state, model.cfg)
    formats = {}
    for name, t in state.items():
        if not t.dtype.is_floating_point:
            continue
        q = stored[name]
        formats[name] = ("fp8" if q.dtype == torch.float8_e4m3fn else
                         "fp4" if q.dtype in (torch.int8, torch.uint8) else
                         "bf16" if q.dtype == torch.bfloat16 else "f32")
    return formats


def as_stored(w: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """``w`` rounded exactly as the checkpoint stores it and the loader reads it back (fp32)."""
    if fmt == "fp8":
        return fp8_block_dequantize(*fp8_block_quantize(w, block), torch.float32, block)
    if fmt == "fp4":
        return mxfp4_dequantize(*mxfp4_quantize(w), torch.float32)
    if fmt == "bf16":
        return w.to(torch.bfloat16).to(torch.float32)
    return w


class StoredView:
    """Swaps a model's weights (those whose official name starts with ``prefix``) for their
    stored (quantised) values and back (QAT)."""

    def __init__(self, model: DeepseekV4, prefix: str = ""):
        self.params = official_parameters(model)
        self.formats = storage_formats(model, prefix)
        self.block = model.cfg.fp8_block[0] if model.cfg.fp8_block else 128
        self.master: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for name, fmt in self.formats.items():
            p = self.params[name]
            self.master[name] = p.detach().clone()
            with torch.no_grad():
                p.copy_(as_stored(p.detach(), fmt, self.block))
        return self

    def __exit__(self, *exc):
        for name, data in self.master.items():
            with torch.no_grad():
                self.params[name].copy_(data)
        self.master = {}

    def snap(self) -> None:
        """Make the stored values the weights for good (end of training)."""
        with torch.no_grad():
            for name, fmt in self.formats.items():
                self.params[name].copy_(as_stored(self.params[name].detach(), fmt, self.block))


# ---- batches ----------------------------------------------------------------------------------
@dataclass
class TrainBatch:
    forward: ForwardBatch
    cache: KVCache
    targets: torch.Tensor  # next-token ids for forward.logits_rows
    # The MTP pass (when cfg.num_mtp_layers): sequence ``i``'s positions 0..L-2 fed the tokens
    # 1..L-1, reading the main streams of ``mtp_rows``; ``mtp_targets`` are the tokens after
    # next (t+2) for ``mtp_forward.logits_rows`` (positions whose t+2 is an assistant token).
    mtp_forward: ForwardBatch | None = None
    mtp_rows: torch.Tensor | None = None  # [T'] rows of ``forward`` whose streams the MTP layer reads
    mtp_targets: torch.Tensor | None = None


def make_batch(cfg: ModelConfig, examples: list[tuple[list[int], list[bool]]]) -> TrainBatch:
    """Each sequence is one chunk from position 0 with its own slots and blocks in a fresh cache
    (with the MTP layer's window layer, index ``cfg.num_layers``, when the config has one)."""
    shape_tokens = 256
    blocks_per_seq = max(-(-len(ids) // shape_tokens) for ids, _ in examples)
    seqs, rows, targets, row = [], [], [], 0
    mtp = cfg.num_mtp_layers > 0
    mtp_seqs, mtp_rows, mtp_lrows, mtp_targets, mrow = [], [], [], [], 0
    for i, (ids, mask) in enumerate(examples):
        c4 = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        seqs.append(SeqView(row_start=row, num_tokens=len(ids), start_pos=0, window_slot=i, state_slot=i,
                            c4_blocks=c4, c128_blocks=[i]))
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                rows.append(row + t)
                targets.append(ids[t + 1])
        if mtp:  # positions 0..L-2, fed token t+1, scored on token t+2
            mtp_seqs.append(SeqView(row_start=mrow, num_tokens=len(ids) - 1, start_pos=0, window_slot=i,
                                    state_slot=i, c4_blocks=c4, c128_blocks=[i]))
            mtp_rows += range(row, row + len(ids) - 1)
            for t in range(len(ids) - 2):
                if mask[t + 2]:
                    mtp_lrows.append(mrow + t)
                    mtp_targets.append(ids[t + 2])
            mrow += len(ids) - 1
        row += len(ids)
    n = len(examples)
    cache = KVCache(cfg, CacheShape(num_window_slots=n, num_state_slots=n, num_c4_blocks=n * blocks_per_seq,
                                    num_c128_blocks=n, c4_block_tokens=shape_tokens), torch.float32, "cpu",
                    extra_window_layers=min(1, cfg.num_mtp_layers))
    fb = ForwardBatch.build([ids for ids, _ in examples], seqs, rows)
    batch = TrainBatch(fb, cache, torch.tensor(targets, dtype=torch.long))
    if mtp:
        batch.mtp_forward = ForwardBatch.build([ids[1:] for ids, _ in examples], mtp_seqs, mtp_lrows)
        batch.mtp_rows = torch.tensor(mtp_rows, dtype=torch.long)
        batch.mtp_targets = torch.tensor(mtp_targets, dtype=torch.long)
    return batch


def mtp_logits(model: DeepseekV4, streams: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """The MTP layer's logits for ``batch.mtp_forward.logits_rows`` (the token after next), from
    the main model's final streams ``[T, hc, D]`` of ``batch.forward``."""
    mb = batch.mtp_forward
    _, hidden = model.mtp_hidden(streams[batch.mtp_rows], mb.input_ids, mb, batch.cache)
    return model.compute_logits(hidden)


def batch_losses(model: DeepseekV4, batch: TrainBatch, main: bool = True,
                 mtp: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(next-token loss, MTP loss on the token after next); None for a part not asked for or
    (MTP) not in the model. Without ``main`` the main model runs without autograd (its weights
    are frozen: only the MTP layer learns)."""
    with torch.set_grad_enabled(main and torch.is_grad_enabled()):
        streams = model.streams(batch.forward, batch.cache)
        main_loss = None
        if main:
            logits = model.compute_logits(model.final_hidden(streams[batch.forward.logits_rows]))
            main_loss = F.cross_entropy(logits, batch.targets)
    mtp_loss = None
    if mtp and len(model.mtp) and batch.mtp_forward is not None:
        mtp_loss = F.cross_entropy(mtp_logits(model, streams, batch), batch.mtp_targets)
    return main_loss, mtp_loss


def batch_loss(model: DeepseekV4, batch: TrainBatch,
               mtp_loss_weight: float = TrainSettings.mtp_loss_weight) -> torch.Tensor:
    """The joint training loss: next-token loss + ``mtp_loss_weight`` × MTP loss."""
    return joint_loss(*batch_losses(model, batch, mtp=mtp_loss_weight > 0), mtp_loss_weight)


def joint_loss(main: torch.Tensor | None, mtp: torch.Tensor | None, mtp_loss_weight: float) -> torch.Tensor:
    """Next-token loss + ``mtp_loss_weight`` × MTP loss; either alone when the other is absent
    (no MTP layer, or only the MTP head training)."""
    if main is None or mtp is None:
        return mtp if main is None else main
    return main + mtp_loss_weight * mtp


def step_examples(seed: int, step: int, batch_size: int, tokenizer: Tokenizer):
    """Step ``step``'s conversations: a function of (seed, step) only."""
    return [tokenize(c, tokenizer) for c in conversations(seed * 1_000_003 + step, batch_size)]


def build_tokenizer(seed: int, out_dir: str, vocab_size: int, corpus: int = 3000) -> Tokenizer:
    """BPE over rendered conversations with the digits left out, so numbers stay one token per
    digit: ten well-trained digit tokens are copyable, a thousand rare 3-digit tokens are not."""
    texts = [re.sub(r"[0-9]", "", c.render()) for c in conversations(seed, corpus)]
    return train_tokenizer(texts, out_dir, vocab_size=vocab_size, special_tokens=DEEPSEEK_SPECIAL_TOKENS)


# ---- training ---------------------------------------------------------------------------------
def lr_at(step: int, total: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, total - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Progress:
    """A one-line progress bar with the running loss (a new line every ``every`` steps)."""

    def __init__(self, stream=sys.stderr, every: int = 10):
        self.stream, self.every, self.start = stream, every, time.time()

    def update(self, step: int, total: int | None, loss: float | None, tokens_per_s: float,
               mtp_loss: float | None = None) -> None:
        done = step / total if total else 0.0
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        elapsed = time.time() - self.start
        eta = f"eta {int(elapsed / done - elapsed) // 60}:{int(elapsed / done - elapsed) % 60:02d}" if done else ""
        losses = (f" loss {loss:.4f}" if loss is not None else "") + (
            f" mtp {mtp_loss:.4f}" if mtp_loss is not None else "")
        line = f"\rstep {step}/{total or '?'} [{bar}]{losses} {tokens_per_s:.0f} tok/s {eta}"
        self.stream.write(line + ("\n" if step % self.every == 0 or step == total else ""))
        self.stream.flush()


def train(settings: TrainSettings, work_dir: str, progress: Progress | None = None) -> TrainResult:
    """Train the demo model (next-token + MTP loss); the tokenizer is written into ``work_dir``."""
    settings.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(settings.seed)
        tokenizer = build_tokenizer(settings.seed, work_dir, settings.vocab_size, settings.tokenizer_corpus)
        cfg = demo_config(tokenizer, dict(settings.shape))
        return _train(settings, init_model(cfg, settings.seed), tokenizer, progress, head_only=False)
    finally:
        torch.set_num_threads(threads)


def train_mtp_head(settings: TrainSettings, base_dir: str, progress: Progress | None = None) -> TrainResult:
    """Train only an MTP layer on top of the frozen checkpoint in ``base_dir`` (its main weights
    and tokenizer; ``settings``' shape and tokenizer fields are not used), loss = MTP loss alone."""
    settings.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(settings.seed)
        model, tokenizer = init_mtp_head(base_dir, settings.seed)
        return _train(settings, model, tokenizer, progress, head_only=True)
    finally:
        torch.set_num_threads(threads)


def _train(settings: TrainSettings, model: DeepseekV4, tokenizer: Tokenizer, progress: Progress | None,
           head_only: bool) -> TrainResult:
    cfg = model.cfg
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    # QAT covers what trains: everything (MTP layer included), or only mtp.* on a frozen model
    # whose weights already are their stored values.
    stored = StoredView(model, prefix="mtp." if head_only else "")
    use_mtp = len(model.mtp) > 0 and (head_only or settings.mtp_loss_weight > 0)
    total = settings.steps
    losses: list[float] = []
    mtp_losses: list[float] = []
    start = time.time()
    step_times: list[float] = []
    tokens = 0
    step = 0

    def objective(batch: TrainBatch) -> torch.Tensor:
        main, mtp = batch_losses(model, batch, main=not head_only, mtp=use_mtp)
        if main is not None:
            losses.append(float(main.detach()))
        if mtp is not None:
            mtp_losses.append(float(mtp.detach()))
        return joint_loss(main, mtp, settings.mtp_loss_weight)

    while total is None or step < total:
        t0 = time.time()
        examples = step_examples(settings.seed, step, settings.batch_size, tokenizer)
        batch = make_batch(cfg, examples)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, settings)
        qat = total is not None and step >= total * (1 - settings.qat_fraction)
        if qat:
            with stored:  # forward/backward on stored values, update the fp32 master copy
                objective(batch).backward()
        else:
            objective(batch).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.forward.num_tokens
        step += 1
        step_times.append(time.time() - t0)
        if total is None and step == 8:
            # Time-boxed run: fix the step count from the measured speed (steps 2..8).
            per_step = sum(step_times[2:]) / len(step_times[2:])
            total = max(step + 1, int(settings.minutes * 60 / per_step))
        if progress is not None:
            progress.update(step, total, _mean(losses[-10:]) if losses else None,
                            tokens / (time.time() - start), _mean(mtp_losses[-10:]) if mtp_losses else None)
    stored.snap()
    return TrainResult(model, cfg, tokenizer, step, _mean(losses[-20:]) if losses else math.nan, losses,
                       time.time() - start, mtp_losses, _mean(mtp_losses[-20:]) if mtp_losses else math.nan)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---- held-out evaluation ----------------------------------------------------------------------
@torch.no_grad()
def heldout_accuracy(model: DeepseekV4, tokenizer: Tokenizer, count: int = 200, seed: int = 0,
                     batch_size: int = 8) -> dict:
    """Top-1 accuracy on ``count`` held-out conversations (``conversations(seed, count, "eval")``),
    scored on assistant tokens: the main model on the next token, the MTP layer on the token
    after next (given the true next token), and how often the MTP layer's argmax at ``t`` equals
    the main model's argmax at ``t+1`` (greedy acceptance of a first draft whose context is
    right)."""
    hits = {"main": 0, "mtp": 0, "agree": 0}
    n_main = n_mtp = 0
    convs = conversations(seed, count, "eval")
    for i in range(0, count, batch_size):
        examples = [tokenize(c, tokenizer) for c in convs[i:i + batch_size]]
        batch = make_batch(model.cfg, examples)
        streams = model.streams(batch.forward, batch.cache)
        # Every row's prediction, so the MTP one at t can be compared with the main one at t+1.
        main_pred = model.compute_logits(model.final_hidden(streams)).argmax(-1)
        rows = batch.forward.logits_rows
        hits["main"] += int((main_pred[rows] == batch.targets).sum())
        n_main += len(batch.targets)
        if len(model.mtp):
            mtp_pred = mtp_logits(model, streams, batch).argmax(-1)
            # MTP row r (sequence position t) sits at main row mtp_rows[r]; t+1 is the next main row.
            main_next = main_pred[batch.mtp_rows[batch.mtp_forward.logits_rows] + 1]
            hits["mtp"] += int((mtp_pred == batch.mtp_targets).sum())
            hits["agree"] += int((mtp_pred == main_next).sum())
            n_mtp += len(batch.mtp_targets)
    out = {"conversations": count, "main_top1": hits["main"] / n_main, "main_tokens": n_main}
    if n_mtp:
        out.update(mtp_top1=hits["mtp"] / n_mtp, mtp_agrees_with_main=hits["agree"] / n_mtp, mtp_tokens=n_mtp)
    return out


# ---- export -----------------------------------------------------------------------------------
def export_checkpoint(model: DeepseekV4, tokenizer_dir: str, out_dir: str) -> None:
    """Write config.json, model.safetensors (official storage), the tokenizer files and
    generation_config.json into ``out_dir``."""
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    state = {n: t.detach().clone() for n, t in official_parameters(model).items()}
    save_safetensors(quantize_official(state, cfg), out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_official_dict(), f, indent=2)
    # DeepSeek's own sampling defaults (temperature 1, top_p 1): in thinking mode the request's
    # temperature is ignored, so greedy defaults would make every thinking reply identical.
    # Measurements (bench/demo_eval.py) decode greedily on their own.
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 1.0, "top_p": 1.0, "bos_token_id": cfg.bos_token_id,
                   "eos_token_id": cfg.eos_token_id}, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))


def export_mtp_head(model: DeepseekV4, base_dir: str, out_dir: str) -> None:
    """``base_dir``'s checkpoint with ``model``'s MTP layer added: every main tensor copied byte for
    byte from ``base_dir`` (an older ``mtp.*`` there is dropped), ``mtp.0.*`` in official storage,
    config.json = ``base_dir``'s with ``num_nextn_predict_layers: 1``, the other files copied."""
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise ValueError("export_mtp_head writes a new directory: out_dir must differ from base_dir")
    os.makedirs(out_dir, exist_ok=True)
    reader = CheckpointReader(base_dir)
    tensors = {orig: reader.get(name) for name, (_, orig) in reader.where.items() if not name.startswith("mtp.")}
    head = {n: t.detach().clone() for n, t in official_parameters(model).items() if n.startswith("mtp.")}
    tensors.update(quantize_official(head, model.cfg))
    save_safetensors(tensors, out_dir)
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    ratios = config.get("compress_ratios")
    if isinstance(ratios, list) and len(ratios) == model.cfg.num_layers:
        config["compress_ratios"] = ratios + [0]  # the MTP layer's entry (sliding-only)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "TRAINING.md"):
        if os.path.exists(os.path.join(base_dir, name)):
            shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))


def _heldout_line(heldout: dict | None, seed: int) -> list[str]:
    if not heldout or "mtp_top1" not in heldout:
        return []
    return [f"- held-out top-1 on assistant tokens ({heldout['conversations']} conversations, "
            f"`conversations({seed}, {heldout['conversations']}, \"eval\")`): next token (main model) "
            f"{heldout['main_top1']:.1%}; token after next (MTP layer, given the true next token) "
            f"{heldout['mtp_top1']:.1%}; MTP argmax = the main model's argmax one position later "
            f"(greedy acceptance of a first draft) {heldout['mtp_agrees_with_main']:.1%}"]


def _mtp_parameters(model_dir: str) -> int:
    model = DeepseekV4(ModelConfig.from_dir(model_dir), torch.float32, mtp=True)
    return sum(p.numel() for p in model.mtp.parameters())


def write_training_notes(out_dir: str, command: str, settings: TrainSettings, steps: int, final_loss: float,
                         seconds: float, final_mtp_loss: float | None = None, heldout: dict | None = None) -> None:
    """``TRAINING.md``: how the checkpoint in ``out_dir`` was made (``bench/demo_eval.py --record``
    appends the held-out figures)."""
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    cfg = ModelConfig.from_dir(out_dir)
    n_params = sum(p.numel() for p in DeepseekV4(cfg, torch.float32, mtp=cfg.num_mtp_layers > 0).parameters())
    mtp_params = f" (MTP layer {_mtp_parameters(out_dir):,})" if cfg.num_mtp_layers else ""
    lines = [
        "# Demo model: training record", "",
        "A tiny DeepSeek-V4 (all three attention types, hash and routed MoE, one multi-token-prediction "
        "layer) trained from scratch with our own implementation on seeded synthetic conversations "
        "(`demo/demo_data.py`), exported in the official layout (FP8 block weights, MXFP4 routed experts).", "",
        f"- command: `{command}`",
        f"- exact repeat: `python -m demo.train_demo --out DIR --seed {settings.seed} --steps {steps} "
        f"--batch-size {settings.batch_size} --lr {settings.lr} --mtp-loss-weight {settings.mtp_loss_weight:g} "
        f"--threads {settings.threads}`",
        f"- seed: {settings.seed}",
        f"- steps: {steps} × {settings.batch_size} conversations; AdamW lr {settings.lr}, warmup "
        f"{settings.warmup}, cosine to {settings.min_lr_ratio}×; last {settings.qat_fraction:.0%} of steps "
        "quantisation-aware; loss on assistant tokens only: next-token loss + "
        f"{settings.mtp_loss_weight:g} × MTP loss (token after next)",
        f"- wall time: {seconds / 60:.1f} minutes ({settings.threads} CPU thread(s), shared machine)",
        f"- final loss (mean of the last 20 steps): {final_loss:.4f}",
    ]
    if final_mtp_loss is not None and not math.isnan(final_mtp_loss):
        lines.append(f"- final MTP loss (mean of the last 20 steps): {final_mtp_loss:.4f}")
    lines += _heldout_line(heldout, settings.seed)
    lines.append(f"- parameters: {n_params:,}{mtp_params}; checkpoint files: {size / 1e6:.2f} MB")
    with open(os.path.join(out_dir, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


MTP_HEADING = "## MTP head"
EVAL_HEADING = "## Held-out evaluation"  # bench/demo_eval.py's section (it replaces everything from there)


def write_mtp_notes(out_dir: str, base_dir: str, command: str, settings: TrainSettings, steps: int,
                    final_mtp_loss: float, seconds: float, heldout: dict | None = None) -> None:
    """Add (or replace) the ``## MTP head`` section of ``out_dir``'s TRAINING.md (copied from
    ``base_dir``), before the held-out evaluation section so that ``demo_eval --record`` keeps it."""
    path = os.path.join(out_dir, "TRAINING.md")
    text = open(path).read() if os.path.exists(path) else "# Demo model: training record\n"
    head, sep, evaluation = text.partition("\n" + EVAL_HEADING)
    head = head.split("\n" + MTP_HEADING)[0].rstrip("\n")
    lines = [
        MTP_HEADING, "",
        "The multi-token-prediction layer (`mtp.0.*`, drafts for speculative decoding) was trained "
        "afterwards on top of the frozen model above: its main tensors are copied byte for byte, so "
        "everything the main model computes is unchanged.", "",
        f"- command: `{command}`",
        f"- exact repeat: `python -m demo.train_demo --mtp-head-from {base_dir} --out DIR --seed {settings.seed} "
        f"--steps {steps} --batch-size {settings.batch_size} --lr {settings.lr} --threads {settings.threads}`",
        f"- steps: {steps} × {settings.batch_size} conversations (the training stream of seed {settings.seed}); "
        f"AdamW lr {settings.lr}, warmup {settings.warmup}, cosine to {settings.min_lr_ratio}×; last "
        f"{settings.qat_fraction:.0%} of steps quantisation-aware (mtp.* only); loss: the MTP layer's "
        "cross-entropy on the token after next, assistant tokens only",
        f"- wall time: {seconds / 60:.1f} minutes ({settings.threads} CPU thread(s), shared machine)",
        f"- final MTP loss (mean of the last 20 steps): {final_mtp_loss:.4f}",
        *_heldout_line(heldout, settings.seed),
        f"- MTP layer parameters: {_mtp_parameters(out_dir):,}",
    ]
    text = head + "\n\n" + "\n".join(lines) + "\n" + (sep + evaluation if sep else "")
    with open(path, "w") as f:
        f.write(text)


# ---- CLI --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0, help="data, tokenizer and init seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step (default 8)")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    parser.add_argument("--mtp-loss-weight", type=float, default=TrainSettings.mtp_loss_weight,
                        help=f"weight of the MTP loss (token after next) in the joint loss "
                             f"(default {TrainSettings.mtp_loss_weight:g})")
    parser.add_argument("--mtp-head-from", default=None, metavar="DIR",
                        help="train only an MTP layer on top of the checkpoint in DIR (its main weights and "
                             "tokenizer frozen and copied byte for byte into --out)")
    parser.add_argument("--eval-conversations", type=int, default=200,
                        help="held-out conversations for the top-1 accuracy in TRAINING.md (default 200; 0: none)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2; use 1 on a machine shared with other jobs)")


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(seed=args.seed, minutes=args.minutes, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, mtp_loss_weight=args.mtp_loss_weight, threads=args.threads)
    settings.validate()
    command = (f"python -m demo.train_demo --out {args.out} --minutes {args.minutes:g} --seed {args.seed} "
               f"--batch-size {args.batch_size} --lr {args.lr:g} --threads {args.threads}"
               + (f" --steps {args.steps}" if args.steps else ""))
    if args.mtp_head_from:
        command = command.replace(" --out ", f" --mtp-head-from {args.mtp_head_from} --out ", 1)
        result = train_mtp_head(settings, args.mtp_head_from, Progress())
        export_mtp_head(result.model, args.mtp_head_from, args.out)
    else:
        command += f" --mtp-loss-weight {args.mtp_loss_weight:g}"
        work = args.out + ".tok"
        result = train(settings, work, Progress())
        export_checkpoint(result.model, work, args.out)
        shutil.rmtree(work, ignore_errors=True)
    heldout = None
    if args.eval_conversations > 0:
        torch.set_num_threads(args.threads)
        heldout = heldout_accuracy(result.model, result.tokenizer, args.eval_conversations, args.seed)
        print(json.dumps(heldout), file=sys.stderr)
    if args.mtp_head_from:
        write_mtp_notes(args.out, args.mtp_head_from, command, settings, result.steps, result.final_mtp_loss,
                        result.seconds, heldout)
    else:
        write_training_notes(args.out, command, settings, result.steps, result.final_loss, result.seconds,
                             result.final_mtp_loss, heldout)
    print(f"wrote {args.out}: {result.steps} steps, final loss {result.final_loss:.4f}, MTP loss "
          f"{result.final_mtp_loss:.4f}, {result.seconds / 60:.1f} min", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.train_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
