"""EngineCore: the synchronous loop. ``step()`` = schedule → run → update → token deltas.

It owns the scheduler (pure Python) and the model runner (tensors). Its outputs carry token ids;
the text (detokenizing, stop strings) is made by each request's ``TextStream`` on the consumer's
side, which finishes a request on a stop string through ``finish_request``. ``LLM`` drives the
core directly; ``AsyncEngine`` drives it from a background thread.
"""
from __future__ import annotations

import logging
import sys
import time
import torch

from engine.core.cache_layout import CacheLayout, CachePool
from engine.model.config import ModelConfig
from engine.default_model import default_model_dir
from engine.engine_config import EngineConfig
from engine.worker.checkpoint_io import export_units, import_units, layout_signature
from engine.worker.kv_cache import CacheShape
from engine.worker.model_runner import SampledTokens
from engine.worker.spec_decode import can_speculate
from engine.core.checkpoint_store import CheckpointStore
from engine.core.kv_cache_manager import KVCacheManager
from engine.outputs import RequestMetrics, RequestOutput, StepStats
from engine.core.request import CacheHints, Request
from engine.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 * 1024 * 1024


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = config.model or default_model_dir()
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = self._load_tokenizer()
        self.generation_defaults = _generation_defaults(self.model_dir)
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)

        if self.uses_mtp and cfg.num_mtp_layers < 1:
            raise ValueError(f"speculative_method 'mtp' needs a checkpoint with a multi-token-prediction layer; "
                             f"{self.model_dir} has none (num_nextn_predict_layers is 0)")
        layout = CacheLayout.from_model(
            # The MTP layer's window is one more sliding-only layer of the window pool.
            list(cfg.compress_ratios) + [0] * self.uses_mtp, cfg.head_dim, cfg.index_head_dim, cfg.sliding_window,
            cfg.rope_dim,
            kv_dtype_bytes=torch.tensor([], dtype=self.dtype).element_size(), kv_cache_dtype=config.kv_cache_dtype,
            ring_slack=config.speculative_tokens,  # rejected drafts must not clobber live ring rows
        )
        log.info("loading checkpoint %s on %s, dtype %s, kv cache %s (%d layers, vocab %d, context %d)",
                 self.model_dir, self.device, str(self.dtype).removeprefix("torch."), config.kv_cache_dtype,
                 cfg.num_layers, cfg.vocab_size, self.max_model_len)
        started = time.monotonic()
        self.runner = self._make_runner(layout)
        log.info("model weights loaded in %.1f s", time.monotonic() - started)
        budget = self._kv_budget()
        self.kv_manager = KVCacheManager.from_budget(
            layout, budget, config.max_num_seqs, enable_prefix_cache=config.enable_prefix_cache,
            unit_interval=config.prefix_cache_unit, snapshot_fraction=config.prefix_cache_snapshot_share,
        )
        pools = self.kv_manager.pools
        log.info("KV cache: budget %.1f MiB, allocated %.1f MiB: %s; longest sequence alone %d tokens; "
                 "max_num_seqs %d, prefix cache %s", budget / 2**20, self.kv_manager.total_bytes / 2**20,
                 ", ".join(f"{kind.value} {pool.num_blocks}" for kind, pool in pools.items()),
                 int(min(self.kv_manager.max_num_tokens, self.max_model_len)), config.max_num_seqs,
                 "on" if config.enable_prefix_cache else "off")
        self.runner.allocate_cache(CacheShape(
            num_window_slots=pools[CachePool.WINDOW].num_blocks,
            num_state_slots=pools[CachePool.STATE].num_blocks,
            num_c4_blocks=pools[CachePool.C4].num_blocks,
            num_c128_blocks=pools[CachePool.C128].num_blocks,
            c4_block_tokens=layout.c4_block_tokens, c128_block_tokens=layout.c128_block_tokens,
            ring_slack=layout.ring_slack,
        ), kv_cache_dtype=config.kv_cache_dtype)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.max_model_len),
            self.kv_manager,
        )
        self._requests: dict[str, Request] = {}  # live requests (the scheduler drops finished ones)
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self.layout = layout
        self.checkpoint_store = self._make_checkpoint_store(layout)
        self._counter_totals = self._cumulative_counters()  # baseline for per-step deltas
        self.last_step_stats: StepStats = self._step_stats(0, 0, 0)

    def _make_checkpoint_store(self, layout: CacheLayout) -> CheckpointStore | None:
        """Host-memory and disk tiers for evicted checkpoints (single-process runners only: a
        tensor-parallel cache is sharded across ranks)."""
        cfg = self.config
        if not cfg.enable_prefix_cache or getattr(self.runner, "cache", None) is None or \
                cfg.tensor_parallel_size > 1 or not (cfg.prefix_cache_host_memory or cfg.prefix_cache_dir):
            return None
        fingerprint = cache_fingerprint(self.model_dir, self.dtype, cfg.kv_cache_dtype, layout,
                                        self.kv_manager.hash_page, layout_signature(self.runner.cache))
        store = CheckpointStore(fingerprint, cfg.prefix_cache_host_memory, cfg.prefix_cache_dir,
                                cfg.prefix_cache_dir_size if cfg.prefix_cache_dir else 0)
        self.kv_manager.attach_store(store)
        return store

    def offload_checkpoints(self) -> int:
        """Evict every device checkpoint into the lower tiers (those worth keeping); how many
        were evicted. Between steps only (like a prefix-cache reset)."""
        count = self.kv_manager.evict_all_checkpoints()
        if self.checkpoint_store is not None:
            self._run_transfers()
        return count

    def _run_transfers(self) -> None:
        """Checkpoint exports (evicted this step: read before anything overwrites their units),
        then imports (lower-tier hits), before the step's forward."""
        exports, imports = self.kv_manager.take_transfers()
        for export in exports:
            self.kv_manager.store_export(export, export_units(self.runner.cache, export.units))
        for transfer in imports:
            import_units(self.runner.cache, transfer.units, transfer.stored.payload)

    def _load_tokenizer(self) -> Tokenizer | None:
        """Checkpoints without tokenizer.json (e.g. written by transformers' save_pretrained)
        still serve token ids; text in and out needs the tokenizer."""
        import os

        if not os.path.exists(os.path.join(self.model_dir, "tokenizer.json")):
            log.warning("%s has no tokenizer.json: token-id prompts only, no text output", self.model_dir)
            return None
        return Tokenizer.from_dir(self.model_dir)

    def _make_runner(self, layout):
        cfg = self.config
        if cfg.tensor_parallel_size > 1:
            from engine.distributed.parallel import ParallelModelRunner

            return ParallelModelRunner(self.model_dir, self.model_config, self.dtype, self.device,
                                       tp_size=cfg.tensor_parallel_size,
                                       enable_expert_parallel=cfg.enable_expert_parallel, seed=cfg.seed,
                                       speculative_method=cfg.speculative_method,
                                       speculative_tokens=cfg.speculative_tokens,
                                       speculative_max_batch=cfg.speculative_max_batch,
                                       fp8_activations=cfg.fp8_activations)
        from engine.worker.model_runner import ModelRunner

        return ModelRunner(self.model_dir, self.model_config, self.dtype, self.device, seed=cfg.seed,
                           compile=cfg.compile, enforce_eager=cfg.enforce_eager,
                           speculative_method=cfg.speculative_method, speculative_tokens=cfg.speculative_tokens,
                           speculative_max_batch=cfg.speculative_max_batch, fp8_activations=cfg.fp8_activations)

    @property
    def uses_mtp(self) -> bool:
        return self.config.speculative_tokens > 0 and self.config.speculative_method == "mtp"

    def _kv_budget(self) -> int:
        if self.config.kv_cache_memory:
            return self.config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.gpu_memory_utilization)
        return CPU_DEFAULT_KV_BYTES

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: str = "", arrival_time: float | None = None,
                    cache_hints: CacheHints | None = None) -> None:
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context window is "
                             f"{self.max_model_len} tokens")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        req = Request(request_id, list(prompt_ids), params, self.model_config.eos_token_id,
                      time.monotonic() if arrival_time is None else arrival_time, cache_salt=cache_salt,
                      cache_hints=cache_hints or CacheHints())
        self._requests[request_id] = req
        self.scheduler.add_request(req)

    def abort(self, request_id: str) -> None:
        req = self.scheduler.abort_request(request_id)
        if req is not None:
            self._pending.append(self._output(req, [], "abort"))
            self._forget(request_id)

    def finish_request(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """End a running request from outside (its stream matched a stop string); its KV is
        kept as an end-of-output checkpoint like any normal finish."""
        req = self.scheduler.finish_request(request_id, reason, stop_reason)
        if req is not None:
            self._pending.append(self._output(req, [], reason, stop_reason=stop_reason))
            self._forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; its counts and the state after it land in ``last_step_stats``."""
        outputs, self._pending = self._pending, []
        self.kv_manager.poll_tiers()
        sched_out = self.scheduler.schedule()
        if self.checkpoint_store is not None:
            self._run_transfers()
            if sched_out.is_empty and self.kv_manager.has_pending_loads():
                time.sleep(0.001)  # only waiting for disk reads: do not spin the loop
        sampled = SampledTokens()
        if not sched_out.is_empty:
            try:
                sampled = self.runner.execute(sched_out, self.scheduler.requests)
            except Exception as e:  # a failed forward must not leak KV or hang clients
                log.exception("model step failed")
                if _is_lost_rank(e):  # no later step can run: let the engine loop die loudly
                    raise
                outputs += self._fail_step(sched_out, f"internal error during generation: {e}")
                self.last_step_stats = self._step_stats(sched_out.num_batched_tokens, 0, 0)
                return outputs
        deltas = self.scheduler.update(sched_out, sampled.token_ids, sampled.verified)
        num_prompt_tokens = num_generation_tokens = 0
        requests, output, append, all_logprobs = self._requests, self._output, outputs.append, sampled.logprobs
        for delta in deltas:  # per sequence per step: keep it lean
            req = requests.get(delta.request_id)
            if req is None:
                continue
            new_ids = delta.new_token_ids
            num_generation_tokens += len(new_ids)
            if new_ids and len(req.output_token_ids) == len(new_ids):
                num_prompt_tokens += len(req.prompt_token_ids)  # prefill done (once: not again after a preemption)
            logprobs = all_logprobs.get(delta.request_id) if all_logprobs else None
            if logprobs is not None and len(logprobs) > len(new_ids):  # a stop dropped verified tokens
                logprobs = logprobs[:len(new_ids)]
            if delta.finished:
                append(output(req, new_ids, delta.finish_reason, True, delta.stop_reason, logprobs))
                self._forget(delta.request_id)
            else:
                append(output(req, new_ids, None, False, None, logprobs))  # positional: cheaper
        self.last_step_stats = self._step_stats(sched_out.num_batched_tokens, num_prompt_tokens,
                                                num_generation_tokens, sampled.spec)
        if self.config.speculative_tokens:
            self._propose_drafts(sampled.drafts)
        return outputs

    def _propose_drafts(self, drafted: dict[str, list[int]] | None) -> None:
        """Drafts for the next step of every running decode, unless the batch is past
        ``speculative_max_batch`` (saturation: verify rows would cost more than they save). A
        request gets no more drafts than its ``max_tokens`` and the context leave room for.
        ``drafted``: what the runner's MTP layer drafted in the step (None: ask the drafter)."""
        if drafted is None and self.uses_mtp:  # no forward ran: the drafts of the last one still hold
            return
        running = self.scheduler.running
        if len(running) > self.config.speculative_max_batch:
            return
        k, max_len, wanted, room = self.config.speculative_tokens, self.max_model_len, [], []
        for r in running:
            if r.num_tokens - r.num_computed_tokens != 1 or not can_speculate(r):
                continue
            left = max_len - r.num_tokens - 1
            max_tokens = r.sampling_params.max_tokens
            if max_tokens is not None:
                left = min(left, max_tokens - r.num_output_tokens - 1)
            if left > 0:
                wanted.append(r)
                room.append(min(k, left))
        if drafted is not None:
            for r, n in zip(wanted, room):
                r.draft_token_ids = drafted.get(r.request_id, [])[:n]
            return
        for r, drafts in zip(wanted, self.runner.propose_drafts(wanted, room)):
            r.draft_token_ids = drafts

    def _cumulative_counters(self, prefix: dict | None = None) -> dict[str, dict]:
        """Every counter the step stats report as deltas, by stats field, totals so far
        (``prefix``: the prefix cache's counters, when the caller has them already)."""
        if prefix is None:
            prefix = self.kv_manager.prefix_cache.counters()
        return {
            "num_preemptions": {None: self.scheduler.num_preemptions},
            "prefix_cache_queries": {None: prefix["query_tokens"]},
            "prefix_cache_hits": {None: prefix["hit_tokens"]},
            "prefix_cache_misses": prefix["miss_tokens_by_reason"],
            "prefix_cache_hits_by_tier": prefix["hit_tokens_by_tier"],
            "prefix_cache_evictions": prefix["evictions"],
            "prefix_cache_load_failures": self.kv_manager.tier_load_failures(),
        }

    def _step_stats(self, num_scheduled: int, num_prompt: int, num_generated: int, spec=None) -> StepStats:
        """The stats of the step just run: counter growth since the previous step, state now."""
        prefix = self.kv_manager.prefix_cache.counters()
        totals = self._cumulative_counters(prefix)
        old, self._counter_totals = self._counter_totals, totals
        deltas = _counter_deltas(old, totals)
        usage = self.kv_manager.usage()
        return StepStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=min(1.0, usage.live_fraction),
            pool_usage={name: (pool.live / pool.total if pool.total else 0.0) for name, pool in usage.pools.items()},
            num_scheduled_tokens=num_scheduled, num_prompt_tokens=num_prompt, num_generation_tokens=num_generated,
            prefix_cache_checkpoints=prefix["checkpoints_by_tier"],
            prefix_cache_checkpoint_bytes={**usage.checkpoint_bytes, **prefix["offloaded_bytes"]},
            **({} if spec is None else dict(
                spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
                spec_num_accepted_tokens=spec.num_accepted_tokens,
                spec_accepted_per_position=spec.accepted_per_position)),
            **deltas,
        )

    def _fail_step(self, sched_out, message: str) -> list[RequestOutput]:
        outs = []
        for ch in sched_out.chunks:
            req = self.scheduler.finish_request(ch.request_id, "error", message)
            if req is not None:
                outs.append(self._output(req, [], "error", finished=True, stop_reason=message))
                self._forget(ch.request_id)
        return outs

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.runner.release(request_id)

    @staticmethod
    def _output(req: Request, new_ids, reason, finished=True, stop_reason=None, logprobs=None):
        if finished:
            reason = getattr(reason, "value", reason)
        else:
            reason = stop_reason = None
        miss = req.miss_reason
        if miss is not None and miss.__class__ is not str:  # a str already (the scheduler stores .value)
            miss = str(getattr(miss, "value", miss))
        cached = req.num_cached_tokens
        # `new_ids` is the output's own list (a fresh one from each caller: the scheduler's deltas
        # are dropped after the step), so no copy; positional: this runs once per sequence per step.
        return RequestOutput(
            req.request_id, new_ids, "", finished, reason, stop_reason, len(req.prompt_token_ids),
            cached if cached > 0 else 0, miss or None, len(req.output_token_ids), logprobs, _metrics(req))

    def stats(self) -> dict:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        """Stop the runner; with checkpoint tiers, first keep the device checkpoints worth
        keeping (see KVCacheManager.checkpoints_to_keep) and finish the disk writes."""
        store, self.checkpoint_store = self.checkpoint_store, None
        if store is not None and not sys.is_finalizing():  # no tensor work during interpreter exit
            self._run_transfers()
            for export in self.kv_manager.checkpoints_to_keep():
                self.kv_manager.store_export(export, export_units(self.runner.cache, export.units))
            store.wait_idle()
            store.close()
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()


def _counter_deltas(old: dict[str, dict], totals: dict[str, dict]) -> dict:
    """By stats field, the growth from ``old`` to ``totals``: an int for a scalar counter (keyed
    None), else a dict of the keys that moved. Most steps move nothing: one comparison then."""
    if totals == old:
        return {name: 0 if None in counts else {} for name, counts in totals.items()}
    deltas = {}
    for name, counts in totals.items():
        moved = {key: n - old[name].get(key, 0) for key, n in counts.items() if n != old[name].get(key, 0)}
        deltas[name] = moved.get(None, 0) if None in counts else moved
    return deltas


def _metrics(req: Request) -> RequestMetrics:
    """The request's timestamps so far. Between stamps every output shares one (never mutated:
    consumers `replace` it), so a decode step builds no metrics object per sequence."""
    m = req.metrics_snapshot
    if m is None or m.first_token_time != req.first_token_time or m.finished_time != req.finished_time \
            or m.num_preemptions != req.num_preemptions or m.first_scheduled_time != req.first_scheduled_time:
        m = req.metrics_snapshot = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                                  req.finished_time, req.num_preemptions)
    return m


def cache_fingerprint(model_dir: str, dtype: torch.dtype, kv_cache_dtype: str, layout: CacheLayout,
                      hash_page: int, tensor_layout: str) -> str:
    """What a stored checkpoint must have been written under to be loaded: the model (its
    config and weight files: names, sizes and their first and last MiB), the model dtype, the
    KV storage format, the block and hash granularity and the cache tensors' layout."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name == "config.json" or name.endswith(".safetensors.index.json"):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
        elif name.endswith(".safetensors"):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                digest.update(f"{name}:{size}".encode() + head + f.read())
    digest.update(f"{dtype}|{kv_cache_dtype}|{layout.c4_block_tokens}|{layout.c128_block_tokens}|{hash_page}|"
                  f"{tensor_layout}".encode())
    return digest.hexdigest()


def _is_lost_rank(e: Exception) -> bool:
    from engine.distributed.failures import ParallelWorkerError  # only reachable with tensor parallelism

    return isinstance(e, ParallelWorkerError)


def _generation_defaults(model_dir: str) -> tuple[float, float]:
    """(temperature, top_p) from generation_config.json; DeepSeek's 1.0 / 1.0 when absent.
    ``do_sample: false`` means greedy."""
    import json
    import os

    path = os.path.join(model_dir, "generation_config.json")
    try:
        with open(path) as f:
            gen = json.load(f)
    except (OSError, ValueError):
        return 1.0, 1.0
    if gen.get("do_sample") is False:
        return 0.0, 1.0
    return float(gen.get("temperature", 1.0)), float(gen.get("top_p", 1.0))
