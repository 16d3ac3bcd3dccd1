"""kv_cache_dtype="fp8": DeepSeek's stored layout (spec §3.13, §4.2), checked against plain-torch
quantisers written here — FP8 entries (e4m3 nope | bf16 rope | e8m0 per 64), FP4 indexer keys
of the Hadamard-rotated key — plus copies, real byte counts vs CacheLayout, and a model run."""
import math

import pytest
import torch

import kernels
from engine import LLM, SamplingParams
from engine.worker.input_batch import ForwardBatch, SeqView
from engine.core.cache_layout import CacheLayout, CachePool
from engine.worker.kv_cache import CacheShape, KVCache
from engine.tiny.make_tiny import make_tiny, tiny_config

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ---- plain-torch reference quantisers ------------------------------------------------------

def ref_fp8_record(x: torch.Tensor, rope: int, record_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] -> (uint8 records [n, record_bytes], dequantised fp32 [n, d]).

    Per 64 nope dims: scale = 2^ceil(log2(max(amax, 1e-4) / 448)), value = e4m3(x / scale)."""
    n, d = x.shape
    nope = d - rope
    n_blocks = math.ceil(nope / 64)
    blocks = torch.zeros(n, n_blocks * 64, dtype=torch.float64)
    blocks[:, :nope] = x[:, :nope].double()
    blocks = blocks.view(n, n_blocks, 64)
    amax = blocks.abs().amax(-1).clamp(min=1e-4)
    exponent = torch.ceil(torch.log2(amax / 448.0))
    scale = torch.exp2(exponent)
    e4m3 = (blocks / scale[..., None]).to(torch.float8_e4m3fn)
    rope_bf16 = x[:, nope:].to(torch.bfloat16)
    record = torch.zeros(n, record_bytes, dtype=torch.uint8)
    record[:, :nope] = e4m3.view(torch.uint8).view(n, -1)[:, :nope]
    record[:, nope:nope + 2 * rope] = rope_bf16.view(torch.uint8)
    record[:, nope + 2 * rope:nope + 2 * rope + n_blocks] = (exponent + 127).to(torch.uint8)
    values = (e4m3.double() * scale[..., None]).view(n, -1)[:, :nope]
    return record, torch.cat([values.float(), rope_bf16.float()], dim=-1)


def sylvester_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def ref_fp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] -> (uint8 packed nibbles + e8m0 per 32 [n, d/2 + d/32], dequantised fp32 [n, d]).

    Scale per 32 = 2^ceil(log2(amax / 6)); nearest e2m1 value; low nibble = even dim; bit 3 = sign."""
    n, d = x.shape
    blocks = x.double().view(n, d // 32, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1) / 6.0))
    scale = torch.exp2(exponent)[..., None]
    scaled = blocks / scale
    code = (scaled.abs()[..., None] - E2M1_GRID.double()).abs().argmin(-1)
    values = (E2M1_GRID.double()[code] * torch.sign(scaled) * scale).view(n, d)
    nibble = (code + 8 * (scaled < 0)).view(n, d).to(torch.uint8)
    packed = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return torch.cat([packed, (exponent + 127).to(torch.uint8)], dim=-1), values.float()


def ref_index_key(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = k.shape[-1]
    rotated = (k.double() @ sylvester_hadamard(d) / math.sqrt(d)).float()
    return ref_fp4(rotated)


def kv_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    """Random rows at several magnitudes, plus edge rows: all zero (amax floor), an amax that is
    exactly 448 * 2^-3 (the scale must not step up), and tiny values (e4m3 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 2, n)[:, None]
    x[0] = 0.0
    x[1, 5] = 448.0 / 8
    x[1, :64].clamp_(-56.0, 56.0)
    x[2] *= 1e-6
    return x


def make_cache(dtype=torch.float32, kv_cache_dtype="fp8", **overrides) -> KVCache:
    cfg = tiny_config(vocab_size=64, **overrides)
    shape = CacheShape(num_window_slots=2, num_state_slots=2, num_c4_blocks=3, num_c128_blocks=2,
                       c4_block_tokens=16, c128_block_tokens=256)
    return KVCache(cfg, shape, dtype, "cpu", kv_cache_dtype=kv_cache_dtype)


# ---- (1) FP8 entries: bytes and values --------------------------------------------------------

@pytest.mark.parametrize("head_dim,rope_dim,record_bytes", [(512, 64, 584), (80, 16, 104), (64, 16, 88)])
def test_entry_records_match_plain_torch_quantiser(head_dim, rope_dim, record_bytes):
    cache = make_cache(head_dim=head_dim, rope_dim=rope_dim)
    assert cache.entry_codec.nbytes == record_bytes
    x = kv_vectors(12, head_dim, seed=head_dim)
    want_bytes, want_values = ref_fp8_record(x, rope_dim, record_bytes)

    pool = cache.c4_kv[1]
    assert pool.dtype == torch.uint8 and pool.shape[-1] == record_bytes
    cache.write_entries(pool, [2, 0, 1], first=0, values=x)  # 12 entries over three blocks of 4
    stored = torch.cat([pool[2], pool[0], pool[1]])
    assert torch.equal(stored, want_bytes)
    got = cache.read_entries(pool, [2, 0, 1], 12)
    assert got.dtype == torch.float32 and torch.equal(got, want_values)
    # This step's tokens see the stored values: the Q/KV kernel rounds with the cache's format
    # (here around a RoPE by angle 0, which only marks the rope dims).
    def rounded(v):
        cos, sin = torch.ones(v.shape[0], rope_dim // 2), torch.zeros(v.shape[0], rope_dim // 2)
        return kernels.norm_rope(v, None, cos, sin, eps=0.0, fmt=cache.kv_format, norm=False)
    assert torch.equal(rounded(x), want_values)
    assert torch.equal(rounded(want_values), want_values)  # storing again changes nothing


def test_window_ring_stores_fp8_records_and_wraps():
    cache = make_cache(dtype=torch.bfloat16, head_dim=80)
    x = kv_vectors(6, 80, seed=3).to(torch.bfloat16)
    want_bytes, want_values = ref_fp8_record(x.float(), 16, 104)
    positions = torch.arange(126, 132)  # ring rows 126, 127, 0, 1, 2, 3
    cache.write_window(2, 1, positions, x)
    assert torch.equal(cache.window[2][1][positions % 128], want_bytes)
    got = cache.read_window(2, 1, positions)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want_values.to(torch.bfloat16))
    assert not torch.equal(got, x)  # the nope dims really were rounded


def test_hca_entries_use_the_entry_record():
    cache = make_cache(head_dim=80)
    x = kv_vectors(3, 80, seed=9)
    _, want_values = ref_fp8_record(x, 16, 104)
    cache.write_entries(cache.c128_kv[2], [1, 0], first=0, values=x[:1])  # two entries a block
    cache.write_entries(cache.c128_kv[2], [1, 0], first=1, values=x[1:])
    assert torch.equal(cache.read_entries(cache.c128_kv[2], [1, 0], 3), want_values)
    assert cache.read_entries(cache.c128_kv[2], [1, 0], 0).shape == (0, 80)


# ---- (2) indexer keys: FP4 of the Hadamard-rotated key ------------------------------------------

@pytest.mark.parametrize("index_head_dim", [32, 128])
def test_index_keys_are_fp4_of_hadamard_rotated_keys(index_head_dim):
    cache = make_cache(head_dim=80, index_head_dim=index_head_dim)
    g = torch.Generator().manual_seed(index_head_dim)
    k = torch.randn(7, index_head_dim, generator=g) * torch.logspace(-2, 1, 7)[:, None]
    want_bytes, want_values = ref_index_key(k)
    pool = cache.c4_idx[3]
    assert pool.dtype == torch.uint8 and pool.shape[-1] == index_head_dim // 2 + index_head_dim // 32
    cache.write_entries(pool, [1, 2], first=2, values=k[2:])  # entries 2..6 of the sequence
    cache.write_entries(pool, [1, 2], first=0, values=k[:2])
    assert torch.equal(torch.cat([pool[1], pool[2]])[:7], want_bytes)
    assert torch.equal(cache.read_entries(pool, [1, 2], 7), want_values)

    # Queries: the same rotation and FP4 simulation, per head.
    q = torch.randn(5, 3, index_head_dim, generator=g)
    _, q_values = ref_index_key(q.view(-1, index_head_dim))
    got = kernels.norm_rope(q, None, None, None, eps=0.0, fmt=cache.index_format, norm=False)
    assert torch.equal(got, q_values.view(5, 3, index_head_dim))
    # The rotation alone is orthogonal: scores equal the unrotated ones up to FP4 error only.
    h = sylvester_hadamard(index_head_dim).float() / math.sqrt(index_head_dim)
    assert torch.allclose((q @ h) @ (k @ h).T, q @ k.T, atol=1e-4)


def test_main_and_index_pools_are_told_apart():
    # The codec is picked by pool identity (indexer-key pools vs entry pools), and a tensor that
    # is not a packed pool of this cache is a clear error.
    cache = make_cache(head_dim=80)
    k = torch.randn(2, 32)
    cache.write_entries(cache.c4_idx[1], [0], 0, k)
    assert torch.equal(cache.read_entries(cache.c4_idx[1], [0], 2), ref_index_key(k)[1])
    with pytest.raises(ValueError, match="pool"):
        cache.write_entries(torch.zeros(3, 4, 80), [0], 0, torch.randn(1, 80))


# ---- copies, bytes, auto unchanged -------------------------------------------------------------

def test_copies_move_packed_records():
    cache = make_cache(head_dim=80)
    x = kv_vectors(4, 80, seed=5)
    k = torch.randn(4, 32)
    cache.write_entries(cache.c4_kv[1], [0], 0, x)
    cache.write_entries(cache.c4_idx[1], [0], 0, k)
    cache.write_window(0, 0, torch.arange(4), x)
    cache.copy("c4", 0, 2)
    cache.copy("window", 0, 1)
    assert torch.equal(cache.read_entries(cache.c4_kv[1], [2], 4), ref_fp8_record(x, 16, 104)[1])
    assert torch.equal(cache.read_entries(cache.c4_idx[1], [2], 4), ref_index_key(k)[1])
    assert torch.equal(cache.read_window(0, 1, torch.arange(4)), ref_fp8_record(x, 16, 104)[1])


@pytest.mark.parametrize("dims", [dict(head_dim=512, rope_dim=64, index_head_dim=128),
                                  dict(head_dim=80, rope_dim=16, index_head_dim=32)])
def test_cache_layout_bytes_match_real_tensors(dims):
    cache = make_cache(**dims)
    cfg, shape = cache.cfg, cache.shape
    layout = CacheLayout.from_model(list(cfg.compress_ratios), cfg.head_dim, cfg.index_head_dim,
                                    cfg.sliding_window, cfg.rope_dim, kv_dtype_bytes=4, kv_cache_dtype="fp8",
                                    c4_block_tokens=shape.c4_block_tokens,
                                    c128_block_tokens=shape.c128_block_tokens)
    real = cache.nbytes()
    assert layout.entry_bytes == cache.entry_codec.nbytes
    assert layout.index_key_bytes == cache.index_codec.nbytes
    assert real["window"] == shape.num_window_slots * layout.unit_bytes(CachePool.WINDOW)
    assert real["state"] == shape.num_state_slots * layout.unit_bytes(CachePool.STATE)
    assert real["c4"] == shape.num_c4_blocks * layout.unit_bytes(CachePool.C4)
    assert real["c128"] == shape.num_c128_blocks * layout.unit_bytes(CachePool.C128)
    per_token = (real["c4"] / (shape.num_c4_blocks * shape.c4_block_tokens)
                 + real["c128"] / (shape.num_c128_blocks * shape.c128_block_tokens))
    assert per_token == pytest.approx(layout.bytes_per_token())


def test_auto_keeps_model_dtype_values_exactly():
    cache = make_cache(dtype=torch.bfloat16, kv_cache_dtype="auto", head_dim=80)
    x = torch.randn(5, 80, dtype=torch.bfloat16)
    assert cache.c4_kv[1].dtype == torch.bfloat16 and cache.c4_kv[1].shape[-1] == 80
    assert cache.kv_format == cache.index_format == kernels.PLAIN
    cache.write_entries(cache.c4_idx[1], [0, 2], 0, x[:, :32])
    assert torch.equal(cache.read_entries(cache.c4_idx[1], [0, 2], 5), x[:, :32])


def test_bad_kv_cache_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_cache(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="index_head_dim"):
        make_cache(index_head_dim=48)


# ---- (3) model-level: tiny checkpoint ----------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_tiny_dir(tmp_path_factory):
    # head_dim 80 (64 nope + 16 rope): CacheLayout accepts fp8 only for whole 64-dim scale blocks.
    d = str(tmp_path_factory.mktemp("tiny_fp8"))
    make_tiny(d, seed=0, head_dim=80)
    return d


@torch.inference_mode()
def chunked_logits(model, ids: list[int], chunks: list[int], kv_cache_dtype: str) -> torch.Tensor:
    """Logits of every position, feeding ``ids`` in ``chunks`` through one fresh cache."""
    shape = CacheShape(num_window_slots=1, num_state_slots=1, num_c4_blocks=-(-len(ids) // 256),
                       num_c128_blocks=1)
    cache = KVCache(model.cfg, shape, model.dtype, "cpu", kv_cache_dtype=kv_cache_dtype)
    out, start = [], 0
    for n in chunks:
        seq = SeqView(0, n, start, 0, 0, list(range(shape.num_c4_blocks)), [0])
        batch = ForwardBatch.build([ids[start:start + n]], [seq], list(range(n)))
        out.append(model.compute_logits(model(batch, cache)))
        start += n
    assert start == len(ids)
    return torch.cat(out)


def test_fp8_model_run_is_close_to_auto_and_chunking_invariant(fp8_tiny_dir):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(2, 1000, (260,), generator=g).tolist()  # 65 c4 entries > top-k 16; 2 HCA

    llm = LLM(fp8_tiny_dir, kv_cache_dtype="fp8", max_num_batched_tokens=53)  # chunked prefill
    cache = llm.engine.runner.cache
    assert cache.kv_cache_dtype == "fp8" and cache.window[0].dtype == torch.uint8
    assert cache.entry_codec.nbytes == llm.engine.layout.entry_bytes == 104
    out = llm.generate([prompt], greedy)[0]
    assert len(out.token_ids) == 6

    # Cached decode == one-shot recomputation of prompt + generated tokens under fp8.
    model = llm.engine.runner.model
    full = prompt + out.token_ids[:-1]
    one_shot = chunked_logits(model, full, [len(full)], "fp8")
    tail = one_shot[len(prompt) - 1:]
    assert tail.argmax(-1).tolist() == out.token_ids
    recomputed_lp = tail.log_softmax(-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(recomputed_lp, torch.tensor([lp.logprob for lp in out.logprobs]), atol=1e-3)

    # Chunked prefill through the fp8 cache equals one-shot prefill.
    chunked = chunked_logits(model, full, [37, 91, 128, 4, 1, 4], "fp8")
    assert (chunked - one_shot).abs().max() < 1e-3

    # fp8 storage moves logits a little, not much (spec §3.13: reference-style rounding).
    auto = chunked_logits(model, full, [len(full)], "auto")
    delta = (one_shot - auto).abs().max().item()
    print(f"max |dlogit| fp8 vs auto: {delta:.4g} (logit scale {auto.abs().max().item():.3g})")
    assert 0 < delta < 0.1
    assert (one_shot.argmax(-1) == auto.argmax(-1)).float().mean() > 0.95
