"""``python -m demo.train_demo``: train the embedded demo model, a tiny DeepSeek-V4 that speaks V4's format.

Pipeline: seeded synthetic conversations (``demo.demo_data``) → a byte-level BPE trained on
them → our own ``DeepseekV4`` trained from scratch (AdamW, warmup + cosine, loss on assistant
tokens only) → an official-layout checkpoint (FP8 block weights, MXFP4 routed experts, BF16
rest; ``engine.tiny.make_tiny.quantize_official``).

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.model.config import ModelConfig
from demo.demo_data import conversations, tokenize
from engine.worker.kv_cache import CacheShape, KVCache
from engine.model.loader import expected_tensors
from engine.tiny.make_tiny import quantize_official, random_official_tensors, save_safetensors, tiny_config
from engine.model.deepseek_v4 import DeepseekV4
from engine.model.quant import fp8_block_dequantize, fp8_block_quantize, mxfp4_dequantize, mxfp4_quantize
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


@dataclass
class TrainResult:
    model: DeepseekV4
    cfg: ModelConfig
    tokenizer: Tokenizer
    steps: int
    final_loss: float  # mean loss over the last 20 steps
    losses: list[float]
    seconds: float


# ---- model ------------------------------------------------------------------------------------
def demo_config(tokenizer: Tokenizer, shape: dict | None = None) -> ModelConfig:
    vocab = -(-tokenizer.vocab_size // 64) * 64
    return tiny_config(vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       **(shape or DEMO_SHAPE))


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
    for i, block in enumerate(model.layers):
        experts = block.ffn.experts
        for local, e in enumerate(experts.expert_ids):
            for part in experts.PARTS:
                out[f"layers.{i}.ffn.experts.{e}.{part}.weight"] = experts.dense_part(part)[local]
    want = set(expected_tensors(model))
    if set(out) != want:
        raise RuntimeError(f"name mapping out of date: extra {sorted(set(out) - want)[:5]}, "
                           f"missing {sorted(want - set(out))[:5]}")
    return out


def init_model(cfg: ModelConfig, seed: int) -> DeepseekV4:
    """A trainable fp32 model with make-tiny's random init (distinct random hash experts per
    token, random sinks/ape/mHC). Frozen: the indexer (top-k selection passes it no gradient)
    and the routers' bias (it only shifts which experts are selected)."""
    model = DeepseekV4(cfg, torch.float32)
    params = official_parameters(model)
    with torch.no_grad():  # copy_: expert weights are views into their stacks
        for name, value in random_official_tensors(cfg, seed).items():
            if name.startswith("mtp."):  # the model has no MTP module yet (issue 13)
                continue
            params[name].copy_(value.to(params[name].dtype))
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." not in name and not name.endswith("gate_bias"))
    return model


# ---- quantisation as exported -----------------------------------------------------------------
def storage_formats(model: DeepseekV4) -> dict[str, str]:
    """How each floating official tensor is stored: fp8, fp4, bf16 or f32."""
    state = {n: t.detach() for n, t in official_parameters(model).items()}
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
    """Swaps a model's weights for their stored (quantised) values and back (QAT)."""

    def __init__(self, model: DeepseekV4):
        self.params = official_parameters(model)
        self.formats = storage_formats(model)
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


def make_batch(cfg: ModelConfig, examples: list[tuple[list[int], list[bool]]]) -> TrainBatch:
    """Each sequence is one chunk from position 0 with its own slots and blocks in a fresh cache."""
    shape_tokens = 256
    blocks_per_seq = max(-(-len(ids) // shape_tokens) for ids, _ in examples)
    seqs, rows, targets, row = [], [], [], 0
    for i, (ids, mask) in enumerate(examples):
        seqs.append(SeqView(row_start=row, num_tokens=len(ids), start_pos=0, window_slot=i, state_slot=i,
                            c4_blocks=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
                            c128_blocks=[i]))
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                rows.append(row + t)
                targets.append(ids[t + 1])
        row += len(ids)
    n = len(examples)
    cache = KVCache(cfg, CacheShape(num_window_slots=n, num_state_slots=n, num_c4_blocks=n * blocks_per_seq,
                                    num_c128_blocks=n, c4_block_tokens=shape_tokens), torch.float32, "cpu")
    fb = ForwardBatch.build([ids for ids, _ in examples], seqs, rows)
    return TrainBatch(fb, cache, torch.tensor(targets, dtype=torch.long))


def batch_loss(model: DeepseekV4, batch: TrainBatch) -> torch.Tensor:
    hidden = model(batch.forward, batch.cache)
    return F.cross_entropy(model.compute_logits(hidden), batch.targets)


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

    def update(self, step: int, total: int | None, loss: float, tokens_per_s: float) -> None:
        done = step / total if total else 0.0
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        elapsed = time.time() - self.start
        eta = f"eta {int(elapsed / done - elapsed) // 60}:{int(elapsed / done - elapsed) % 60:02d}" if done else ""
        line = f"\rstep {step}/{total or '?'} [{bar}] loss {loss:.4f} {tokens_per_s:.0f} tok/s {eta}"
        self.stream.write(line + ("\n" if step % self.every == 0 or step == total else ""))
        self.stream.flush()


def train(settings: TrainSettings, work_dir: str, progress: Progress | None = None) -> TrainResult:
    """Train the demo model; the tokenizer is written into ``work_dir``."""
    settings.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(settings, work_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(settings: TrainSettings, work_dir: str, progress: Progress | None) -> TrainResult:
    torch.manual_seed(settings.seed)
    tokenizer = build_tokenizer(settings.seed, work_dir, settings.vocab_size, settings.tokenizer_corpus)
    cfg = demo_config(tokenizer, dict(settings.shape))
    model = init_model(cfg, settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    stored = StoredView(model)
    total = settings.steps
    losses: list[float] = []
    start = time.time()
    step_times: list[float] = []
    tokens = 0
    step = 0
    while total is None or step < total:
        t0 = time.time()
        examples = step_examples(settings.seed, step, settings.batch_size, tokenizer)
        batch = make_batch(cfg, examples)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, settings)
        qat = total is not None and step >= total * (1 - settings.qat_fraction)
        if qat:
            with stored:  # forward/backward on stored values, update the fp32 master copy
                loss = batch_loss(model, batch)
                loss.backward()
        else:
            loss = batch_loss(model, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += batch.forward.num_tokens
        step += 1
        step_times.append(time.time() - t0)
        if total is None and step == 8:
            # Time-boxed run: fix the step count from the measured speed (steps 2..8).
            per_step = sum(step_times[2:]) / len(step_times[2:])
            total = max(step + 1, int(settings.minutes * 60 / per_step))
        if progress is not None:
            progress.update(step, total, sum(losses[-10:]) / len(losses[-10:]), tokens / (time.time() - start))
    stored.snap()
    tail = losses[-20:]
    return TrainResult(model, cfg, tokenizer, step, sum(tail) / len(tail), losses, time.time() - start)


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


def write_training_notes(out_dir: str, command: str, settings: TrainSettings, steps: int, final_loss: float,
                         seconds: float) -> None:
    """``TRAINING.md``: how the checkpoint in ``out_dir`` was made (``bench/demo_eval.py --record``
    appends the held-out figures)."""
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    n_params = sum(p.numel() for p in DeepseekV4(ModelConfig.from_dir(out_dir), torch.float32).parameters())
    lines = [
        "# Demo model: training record", "",
        "A tiny DeepSeek-V4 (all three attention types, hash and routed MoE) trained from scratch with "
        "our own implementation on seeded synthetic conversations (`demo/demo_data.py`), exported in "
        "the official layout (FP8 block weights, MXFP4 routed experts).", "",
        f"- command: `{command}`",
        f"- exact repeat: `python -m demo.train_demo --out DIR --seed {settings.seed} --steps {steps} "
        f"--batch-size {settings.batch_size} --lr {settings.lr} --threads {settings.threads}`",
        f"- seed: {settings.seed}",
        f"- steps: {steps} × {settings.batch_size} conversations; AdamW lr {settings.lr}, warmup "
        f"{settings.warmup}, cosine to {settings.min_lr_ratio}×; last {settings.qat_fraction:.0%} of steps "
        "quantisation-aware; loss on assistant tokens only",
        f"- wall time: {seconds / 60:.1f} minutes ({settings.threads} CPU thread(s), shared machine)",
        f"- final loss (mean of the last 20 steps): {final_loss:.4f}",
        f"- parameters: {n_params:,}; checkpoint files: {size / 1e6:.2f} MB",
    ]
    with open(os.path.join(out_dir, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- CLI --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0, help="data, tokenizer and init seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step (default 8)")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (default 5e-3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2; use 1 on a machine shared with other jobs)")


def run(args: argparse.Namespace) -> int:
    settings = TrainSettings(seed=args.seed, minutes=args.minutes, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, threads=args.threads)
    settings.validate()
    work = args.out + ".tok"
    result = train(settings, work, Progress())
    export_checkpoint(result.model, work, args.out)
    shutil.rmtree(work, ignore_errors=True)
    command = (f"python -m demo.train_demo --out {args.out} --minutes {args.minutes:g} --seed {args.seed} "
               f"--batch-size {args.batch_size} --lr {args.lr:g} --threads {args.threads}"
               + (f" --steps {args.steps}" if args.steps else ""))
    write_training_notes(args.out, command, settings, result.steps, result.final_loss, result.seconds)
    print(f"wrote {args.out}: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.seconds / 60:.1f} min", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.train_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
