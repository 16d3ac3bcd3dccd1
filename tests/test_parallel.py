"""Tensor / expert parallel (engine/distributed/): world size 2 on gloo against one process.

Each world-size-2 test spawns one worker process (rank 1); this process is the driver (rank 0).
Only one group can live in a process at a time, so every test builds and shuts down its own.
"""
import os
import signal
import time

import pytest
import torch

from engine.core.cache_layout import CachePool
from engine.model.config import ModelConfig
from engine.worker.kv_cache import CacheShape
from engine.core.kv_cache_manager import BlockTable, CacheCopy
from engine.core.scheduler import ScheduledChunk
from engine.model.loader import CheckpointError, CheckpointReader, load_weights
from engine.model.deepseek_v4 import DeepseekV4, Parallel
from engine.model.sharding import Split
from engine.worker.model_runner import ModelRunner
from engine.distributed.failures import ParallelWorkerError
from engine.distributed.memory import weight_bytes
from engine.distributed.parallel import ParallelModelRunner

SHAPE = CacheShape(num_window_slots=3, num_state_slots=3, num_c4_blocks=6, num_c128_blocks=3)
# Scattered blocks on purpose. "c" continues from a snapshot of "a" taken after a's prompt.
TABLES = {"a": BlockTable(0, 0, [3, 0], [2]), "b": BlockTable(1, 1, [5], [0]), "c": BlockTable(2, 2, [1, 4], [1])}
SNAPSHOT_A_TO_C = [CacheCopy(CachePool.WINDOW, 0, 2), CacheCopy(CachePool.STATE, 0, 2),
                   CacheCopy(CachePool.C4, 3, 1), CacheCopy(CachePool.C4, 0, 4), CacheCopy(CachePool.C128, 2, 1)]
DECODE_STEPS = 16


def _prompt(n, mult, vocab):
    return [(i * mult + 11) % (vocab - 20) + 10 for i in range(n)]


def _chunk(name, ids, start):
    return ScheduledChunk(name, list(ids), start, True, TABLES[name])


def run_schedule(runner, vocab):
    """Chunked prefill of a 300-token and a 150-token prompt in shared steps (every layer type:
    sliding window wraps, CSA with indexer top-k over 75 entries, HCA), a snapshot copy, then
    16 greedy decode steps of three sequences. Returns (logits per step, tokens per sequence)."""
    a, b = _prompt(300, 37, vocab), _prompt(150, 53, vocab)
    logits_per_step, out = [], {}

    def step(chunks, after=()):
        logits = runner.forward(chunks, (), list(after))
        logits_per_step.append(logits)
        return logits.argmax(dim=-1).tolist()

    step([_chunk("a", a[:120], 0), _chunk("b", b[:70], 0)])
    b0 = step([_chunk("a", a[120:240], 120), _chunk("b", b[70:], 70)])[1]
    a0, b1 = step([_chunk("a", a[240:], 240), _chunk("b", [b0], 150)], after=SNAPSHOT_A_TO_C)
    out = {"a": [a0], "b": [b0, b1], "c": [(a0 + 1) % vocab]}
    pos = {"a": 300, "b": 151, "c": 300}
    for _ in range(DECODE_STEPS):
        names = list(out)
        for n, t in zip(names, step([_chunk(n, [out[n][-1]], pos[n]) for n in names])):
            out[n].append(t)
            pos[n] += 1
    return logits_per_step, out


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank():
    """Two ranks on two cores: more intra-op threads only fight (ParallelModelRunner sets this
    too; the single-process reference gets the same so the timing stays predictable)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return ModelConfig.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir, cfg):
    runner = ModelRunner(tiny_dir, cfg, torch.float32, torch.device("cpu"))
    runner.allocate_cache(SHAPE)
    logits, tokens = run_schedule(runner, cfg.vocab_size)
    return runner, logits, tokens


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "tp_ep"])
def test_world_size_2_matches_one_process(tiny_dir, cfg, reference, expert_parallel):
    runner = ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", SHAPE, tp_size=2,
                                 enable_expert_parallel=expert_parallel, timeout_s=60)
    try:
        logits, tokens = run_schedule(runner, cfg.vocab_size)
        report = runner.memory_report()
        rank0_experts = set(runner.model.layers[2].ffn.experts)
    finally:
        runner.shutdown()
    ref_runner, ref_logits, ref_tokens = reference
    worst = max((x - y).abs().max().item() for x, y in zip(ref_logits, logits))
    assert worst <= 1e-4, f"max |Δlogit| {worst:.3g}"
    assert tokens == ref_tokens
    assert rank0_experts == ({str(e) for e in range(4)} if expert_parallel else {str(e) for e in range(8)})

    # Each rank holds half of the split weights; replicated parts (router, mHC, norms) whole.
    full = weight_bytes(ref_runner.model)
    assert [m.rank for m in report] == [0, 1]
    for m in report:
        for part in ("embed_head", "routed_experts", "shared_expert"):
            assert abs(m.weights[part] - full[part] / 2) <= 0.01 * full[part], part
        assert m.weights["other"] == full["other"]
        # Query/indexer heads and output groups halve; the single KV head and compressors do not.
        assert 0.5 * full["attention"] < m.weights["attention"] < 0.8 * full["attention"]
        assert m.weight_bytes < 0.65 * sum(full.values())
        assert m.kv_cache == sum(ref_runner.cache.nbytes().values())


def test_rank_reads_only_its_slices(tiny_dir, cfg, reference, monkeypatch):
    """Rank 1 of TP+EP, loaded in-process: every split tensor comes from a slice read, and the
    slices are the right rows/columns/experts of the full model."""
    whole_reads = []
    read_whole = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, n: whole_reads.append(n) or read_whole(self, n))
    identity = lambda t: t  # noqa: E731 — no collectives run at load time
    par = Parallel(2, 1, True, all_reduce=identity, all_gather_vocab=identity)
    model = DeepseekV4(cfg, par=par)
    load_weights(model, tiny_dir)
    assert [n for n in whole_reads if par.split_for(n, cfg) is not None] == []
    assert not [n for n in whole_reads if ".experts.0." in n]  # rank 0's experts are never read
    full = reference[0].model
    attn, fattn = model.layers[1].attn, full.layers[1].attn
    assert torch.equal(attn.wq_b.weight, fattn.wq_b.weight[128:256])
    assert torch.equal(attn.wo_a.weight, fattn.wo_a.weight[32:64])
    assert torch.equal(attn.wo_b.weight, fattn.wo_b.weight[:, 32:64])
    assert torch.equal(attn.attn_sink, fattn.attn_sink[2:4])
    assert torch.equal(attn.indexer.wq_b.weight, fattn.indexer.wq_b.weight[256:512])
    assert torch.equal(attn.indexer.weights_proj.weight, fattn.indexer.weights_proj.weight[8:16])
    assert torch.equal(attn.wkv.weight, fattn.wkv.weight)
    assert torch.equal(model.head, full.head[cfg.vocab_size // 2:])
    assert torch.equal(model.layers[0].ffn.shared.w2.weight, full.layers[0].ffn.shared.w2.weight[:, 32:64])
    assert set(model.layers[0].ffn.experts) == {"4", "5", "6", "7"}
    assert torch.equal(model.layers[0].ffn.experts["5"].w2.weight, full.layers[0].ffn.experts["5"].w2.weight)


@pytest.mark.parametrize("name, split, message", [
    ("layers.0.attn.wq_b.weight", Split(0, 64, 192), "FP8 scale block"),
    ("layers.0.ffn.experts.0.w2.weight", Split(1, 16, 48), "MXFP4's 32-column"),
], ids=["fp8_rows", "mxfp4_columns"])
def test_misaligned_quantised_split_is_refused(tiny_dir, cfg, name, split, message):
    with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
        load_weights(DeepseekV4(cfg), tiny_dir, shard=lambda n: split if n == name else None)


def test_indivisible_world_size_is_refused_before_spawning(tiny_dir, cfg):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_attention_heads \(4\)"):
        ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", tp_size=3)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_worker_fault_raises_in_driver(tiny_dir, cfg, fault):
    runner = ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", SHAPE, tp_size=2, timeout_s=4)
    chunk = [_chunk("a", _prompt(20, 37, cfg.vocab_size), 0)]
    try:
        assert runner.forward(chunk).shape == (1, cfg.vocab_size)
        (pid,) = runner.worker_pids
        os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        expected = "worker rank 1 exited with code -9" if fault == "killed" else "did not respond within 4 s"
        start = time.monotonic()
        with pytest.raises(ParallelWorkerError, match=expected):
            runner.forward(chunk)
        assert time.monotonic() - start < 15
        with pytest.raises(ParallelWorkerError, match="group is down"):
            runner.forward(chunk)
        with pytest.raises(ParallelWorkerError, match="group is down"):
            runner.check_alive()
    finally:
        runner.shutdown()
    with pytest.raises(ProcessLookupError):  # the driver reaped the worker, stopped or not
        os.kill(pid, 0)


def _greedy_llm_run(tiny_dir, **parallel):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [_prompt(300, 37, 1000), "def fibonacci(n):\n    return"]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    llm = LLM(tiny_dir, max_num_batched_tokens=128, kv_cache_memory=32 << 20, **parallel)
    try:
        return llm.generate(prompts, params)
    finally:
        llm.shutdown()


def test_llm_generate_with_tensor_and_expert_parallel(tiny_dir):
    """End to end through LLM.generate (scheduler, chunked prefill at 128 tokens, prefix cache)."""
    single = _greedy_llm_run(tiny_dir)
    parallel = _greedy_llm_run(tiny_dir, tensor_parallel_size=2, enable_expert_parallel=True)
    for one, two in zip(single, parallel):
        assert two.token_ids == one.token_ids and two.text == one.text and len(one.token_ids) == 12
        worst = max(abs(p.logprob - q.logprob) for p, q in zip(one.logprobs, two.logprobs))
        assert worst <= 1e-4


def test_http_server_with_tensor_parallel(tiny_dir):
    """The same completion from a single-process server and a TP=2 server; then a killed
    worker: the next request returns promptly with no tokens and the runner names the rank."""
    import httpx

    from engine.async_engine import AsyncEngine
    from engine.engine_config import EngineConfig
    from server.app import BackgroundServer, create_app
    from server.serve_config import ServeConfig

    body = {"model": "tiny", "prompt": "def fibonacci(n):\n    " * 12, "max_tokens": 8, "temperature": 0,
            "logprobs": 1}
    replies = {}
    for tp in (1, 2):
        engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=32 << 20, max_num_batched_tokens=64,
                                          tensor_parallel_size=tp))
        server = BackgroundServer(create_app(engine, ServeConfig(served_model_name="tiny")))
        server.start()
        try:
            reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200
            replies[tp] = reply.json()["choices"][0]
            if tp == 2:
                runner = engine.core.runner
                os.kill(runner.worker_pids[0], signal.SIGKILL)
                start = time.monotonic()
                after = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
                assert time.monotonic() - start < 15
                assert after.status_code != 200 or after.json()["usage"]["completion_tokens"] == 0
                with pytest.raises(ParallelWorkerError, match="worker rank 1 exited with code -9"):
                    runner.check_alive()
                # The engine stops serving with a clear error instead of hanging clients.
                assert httpx.get(server.base_url + "/health", timeout=10).status_code == 503
                again = httpx.post(server.base_url + "/v1/completions", json=body, timeout=10)
                assert again.status_code == 503 and "worker rank 1" in again.json()["error"]["message"]
        finally:
            server.stop()
    assert replies[2]["text"] == replies[1]["text"]
    one, two = (replies[tp]["logprobs"]["token_logprobs"] for tp in (1, 2))
    assert len(one) == 8 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-4


def test_torchrun_style_env_launch(tiny_dir, cfg, reference, monkeypatch):
    """Multi-node path: rank 1 is a separate `python -m engine.distributed.worker` (as on another node,
    ranked by NODE_RANK); rank 0 finds the group through the same environment variables."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    worker = subprocess.Popen([sys.executable, "-m", "engine.distributed.worker"], cwd=repo,
                              env={**worker_env, **env, "NODE_RANK": "1", "OMP_NUM_THREADS": "1"})
    try:
        for k, v in {**env, "RANK": "0"}.items():
            monkeypatch.setenv(k, v)
        runner = ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", SHAPE, tp_size=2, timeout_s=60)
        try:
            assert runner.worker_pids == []
            a = _prompt(300, 37, cfg.vocab_size)
            logits = runner.forward([_chunk("a", a[:120], 0), _chunk("b", _prompt(150, 53, cfg.vocab_size)[:70], 0)])
        finally:
            runner.shutdown()
        assert (logits - reference[1][0]).abs().max().item() <= 1e-4
        assert worker.wait(timeout=30) == 0  # the shutdown command ends the worker cleanly
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_env_launch_is_validated(tiny_dir, cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    with pytest.raises(ValueError, match="neither RANK nor NODE_RANK"):
        ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", tp_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not match WORLD_SIZE=4"):
        ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", tp_size=2)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="rank 0 only"):
        ParallelModelRunner(tiny_dir, cfg, torch.float32, "cpu", tp_size=2)
