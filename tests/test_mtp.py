"""The MTP layer (spec §3.11) as a drafter: it loads from ``mtp.0.*``, its KV window is budgeted
like a sliding layer's, and the drafts the engine proposes step after step — through prefill
chunks, decode and verify chunks, prefix-cache hits and preemption — equal the MTP layer run
from scratch over the sequence's whole history on a fresh cache."""
import pytest
import torch
from safetensors import safe_open

from engine.core.cache_layout import CachePool
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.model.config import ModelConfig
from engine.model.deepseek_v4 import DeepseekV4
from engine.model.loader import load_weights
from engine.tiny.make_tiny import make_tiny
from engine.sampling_params import SamplingParams
from engine.worker.input_batch import ForwardBatch, SeqView
from engine.worker.kv_cache import CacheShape, KVCache


def _mtp_model(model_dir: str) -> DeepseekV4:
    cfg = ModelConfig.from_dir(model_dir)
    model = DeepseekV4(cfg, torch.float32, mtp=True)
    load_weights(model, model_dir)
    return model


def test_mtp_layer_loads_from_the_checkpoint(tiny_dir):
    model = _mtp_model(tiny_dir)
    with safe_open(f"{tiny_dir}/model.safetensors", "pt") as f:
        names = [n for n in f.keys() if n.startswith("mtp.0.")]
        assert len(names) > 50
        want = f.get_tensor("mtp.0.attn.attn_sink")
        hc = f.get_tensor("mtp.0.hc_head_fn")
    assert torch.equal(model.mtp[0].attn.attn_sink, want.float())
    assert torch.equal(model.mtp[0].hc_head.fn, hc.float())
    assert model.mtp[0].layer == model.cfg.num_layers and model.mtp[0].attn.ratio == 0
    assert not model.mtp[0].ffn.is_hash  # a routed (non-hash) MoE whatever num_hash_layers is
    plain = DeepseekV4(model.cfg, torch.float32)
    assert load_weights(plain, tiny_dir)["skipped_mtp"] == len(names)


def test_mtp_needs_a_checkpoint_with_the_layer(tmp_path):
    make_tiny(str(tmp_path), seed=0)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"num_nextn_predict_layers": 1', '"num_nextn_predict_layers": 0'))
    with pytest.raises(ValueError, match="multi-token-prediction"):
        EngineCore(EngineConfig(model=str(tmp_path), speculative_tokens=2, speculative_method="mtp"))


def test_the_mtp_window_is_in_the_cache_budget(tiny_dir):
    plain = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=2, speculative_tokens=2))
    mtp = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=2, speculative_tokens=2, speculative_method="mtp"))
    layers = plain.model_config.num_layers
    assert mtp.layout.unit_bytes(CachePool.WINDOW) * layers == plain.layout.unit_bytes(CachePool.WINDOW) * (layers + 1)
    assert len(mtp.runner.cache.window) == layers + 1 and len(plain.runner.cache.window) == layers
    assert mtp.runner.cache.nbytes()["window"] <= mtp.kv_manager.pools[CachePool.WINDOW].num_blocks \
        * mtp.layout.unit_bytes(CachePool.WINDOW)


@torch.inference_mode()
def _reference_drafts(model: DeepseekV4, history: list[int], k: int) -> list[int]:
    """The target over the whole history, the MTP layer over every position but the last (next
    tokens = the history shifted), then k - 1 chained single positions: on a fresh cache."""
    n = len(history)
    cfg = model.cfg
    cache = KVCache(cfg, CacheShape(1, 1, -(-n // 256) + 1, 1), model.dtype, "cpu", extra_window_layers=1)
    blocks = (list(range(cache.shape.num_c4_blocks)), [0])

    def batch(tokens, start, rows):
        return ForwardBatch.build([tokens], [SeqView(0, len(tokens), start, 0, 0, *blocks)], rows)

    streams = model.streams(batch(history, 0, [n - 1]), cache)
    if n == 1:
        return []
    mb = batch(history[1:], 0, [n - 2])
    out, hidden = model.mtp_hidden(streams[:-1], mb.input_ids, mb, cache)
    drafts = [int(model.compute_logits(hidden).argmax())]
    prev = out[-1:]
    for j in range(1, k):  # the catch-up's last position is n - 2
        step = batch([drafts[-1]], n - 2 + j, [0])
        prev, hidden = model.mtp_hidden(prev, step.input_ids, step, cache)
        drafts.append(int(model.compute_logits(hidden).argmax()))
    return drafts


def _drive(core: EngineCore, prompts, params, tag: str, seen: list) -> None:
    """Staggered arrivals; after every step, each request's drafts with its history then."""
    pending = list(range(len(prompts)))
    while pending or core.has_unfinished():
        for _ in range(3):
            if pending:
                i = pending.pop(0)
                core.add_request(f"{tag}{i}", prompts[i], params[i])
        core.step()
        for r in core.scheduler.running:
            if r.draft_token_ids:
                seen.append((r.prompt_token_ids + r.output_token_ids, list(r.draft_token_ids)))


def test_engine_drafts_equal_the_mtp_layer_run_from_scratch(tiny_dir, k=3):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (1, 200, 37, 129, 3, 70)]
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    # Small chunks and blocks: prompts span several prefill chunks and prefix-cache units.
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8, max_num_batched_tokens=64, prefix_cache_unit=64,
                                   speculative_tokens=k, speculative_method="mtp"))
    seen = []
    _drive(core, prompts, params, "a", seen)
    hits = core.kv_manager.prefix_cache.counters()["hit_tokens"]
    _drive(core, prompts, params, "b", seen)  # again: end-of-output checkpoints restored
    # Shared prefixes, new tails: mid-prompt snapshots restored (their MTP window included).
    forks = [p[:len(p) * 3 // 4] + torch.randint(2, 1024, (20,), generator=g).tolist() for p in prompts]
    _drive(core, forks, params, "c", seen)
    # One long prompt alone (whole 64-token chunks, a snapshot after each), then a fork resuming
    # from its snapshot at 256: the restored MTP window must hold the chunk before it.
    long = torch.randint(2, 1024, (300,), generator=g).tolist()
    _drive(core, [long], params[1:], "d", seen)
    _drive(core, [long[:270] + torch.randint(2, 1024, (9,), generator=g).tolist()], params[1:], "e", seen)
    assert core.kv_manager.prefix_cache.counters()["hit_tokens"] > hits + 128 + 256
    model = _mtp_model(tiny_dir)
    assert len(seen) > 50
    for history, drafts in seen:
        assert drafts == _reference_drafts(model, history, k)[:len(drafts)], len(history)


def test_demo_model_drafts_are_accepted_and_match_the_layer_from_scratch():
    """The embedded demo model's trained MTP head: most drafts are accepted, so verify chunks
    keep several tokens and the catch-up passes cover several rows; its drafts still equal the
    MTP layer run from scratch."""
    from demo.demo_data import eval_conversations
    from engine.default_model import default_model_dir
    from engine.tokenizer import Tokenizer

    model_dir = default_model_dir()
    tok = Tokenizer.from_dir(model_dir)
    convs = eval_conversations(seed=1, per_kind=2)[:4]
    prompts = [tok.encode(c.render(c.prompt_messages(), add_generation_prompt=True)) for c in convs]
    params = [SamplingParams(max_tokens=24, temperature=0)] * len(prompts)
    core = EngineCore(EngineConfig(model=model_dir, max_num_seqs=4, speculative_tokens=2, speculative_method="mtp"))
    seen, drafts, accepted = [], 0, 0
    pending = list(range(len(prompts)))
    while pending or core.has_unfinished():
        if pending:
            i = pending.pop(0)
            core.add_request(f"r{i}", prompts[i], params[i])
        core.step()
        drafts += core.last_step_stats.spec_num_draft_tokens
        accepted += core.last_step_stats.spec_num_accepted_tokens
        seen += [(r.prompt_token_ids + r.output_token_ids, list(r.draft_token_ids))
                 for r in core.scheduler.running if r.draft_token_ids]
    assert drafts > 40 and accepted > 0.5 * drafts, (accepted, drafts)
    model = _mtp_model(model_dir)
    for history, got in seen:
        assert got == _reference_drafts(model, history, 2)[:len(got)], len(history)


def test_serve_flags_select_mtp_drafting():
    from server.cli import build_configs, build_parser

    args = build_parser().parse_args(["serve", "--speculative-tokens", "2", "--speculative-method", "mtp"])
    engine_config, _, _ = build_configs(args)
    assert (engine_config.speculative_tokens, engine_config.speculative_method) == (2, "mtp")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-method", "eagle"])


def test_tensor_parallel_ranks_draft_what_one_process_drafts(tiny_dir):
    """Every rank runs the MTP passes on its shard (vocab-parallel head, split heads, EP
    experts): the drafts equal the single-process ones."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (5, 90, 33)]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 3
    config = dict(model=tiny_dir, max_num_seqs=4, kv_cache_memory=32 << 20, speculative_tokens=2,
                  speculative_method="mtp")
    one, parallel = [], []
    _drive(EngineCore(EngineConfig(**config)), prompts, params, "a", one)
    core = EngineCore(EngineConfig(**config, tensor_parallel_size=2, enable_expert_parallel=True))
    try:
        _drive(core, prompts, params, "a", parallel)
    finally:
        core.shutdown()
    assert len(one) > 10 and parallel == one
