"""dsv4:* metrics: names, labels and values in the text exposition, fed from StepStats and
RequestTimings; the periodic stats log line."""

from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import StepStats
from server.metrics import KV_POOLS, Metrics, RequestTimings, StatsLogger, check_step_stats
from server.pricing import CostBreakdown

MODEL = "deepseek-v4-flash"

EXPECTED = {
    "num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
    "kv_cache_pool_usage_perc": "gauge", "prefix_cache_queries": "counter", "prefix_cache_hits": "counter",
    "prefix_cache_misses": "counter", "prompt_tokens": "counter", "generation_tokens": "counter",
    "num_preemptions": "counter", "request_success": "counter", "tokens": "counter", "cost_usd": "counter",
    "tool_parse_errors": "counter", "time_to_first_token_seconds": "histogram",
    "api_requests": "counter", "api_cost_usd": "counter",
    "inter_token_latency_seconds": "histogram", "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram", "request_queue_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram", "request_decode_time_seconds": "histogram",
    "request_prompt_tokens": "histogram", "request_generation_tokens": "histogram",
    "iteration_tokens_total": "histogram", "prefix_cache_tier_hits": "counter",
    "prefix_cache_evictions": "counter", "prefix_cache_load_failures": "counter",
    "prefix_cache_checkpoints": "gauge", "prefix_cache_checkpoint_bytes": "gauge",
    "spec_decode_num_drafts": "counter", "spec_decode_num_draft_tokens": "counter",
    "spec_decode_num_accepted_tokens": "counter", "spec_decode_num_accepted_tokens_per_pos": "counter",
}


def _samples(metrics: Metrics) -> dict:
    """(sample name, frozenset of labels other than model_name) -> value; checks model_name on all."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("model_name") == metrics.model_name, sample
            out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def _value(metrics: Metrics, name: str, **labels) -> float:
    return _samples(metrics)[(f"dsv4:{name}", frozenset(labels.items()))]


def _step(**overrides) -> StepStats:
    values = dict(num_running=3, num_waiting=2, kv_cache_usage=0.4,
                  pool_usage={"window": 0.1, "state": 0.2, "c4": 0.5, "c128": 0.05},
                  num_scheduled_tokens=300, num_prompt_tokens=256, num_generation_tokens=3, num_preemptions=1,
                  prefix_cache_queries=256, prefix_cache_hits=128, prefix_cache_misses={"partial_unit": 100})
    values.update(overrides)
    return StepStats(**values)


def _timings(**overrides) -> RequestTimings:
    values = dict(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0, finished_time=13.0,
                  finish_reason="stop", num_prompt_tokens=1000, num_cached_tokens=600, num_generation_tokens=5,
                  inter_token_latencies=(0.5, 0.5, 0.5, 0.5))
    values.update(overrides)
    return RequestTimings(**values)


def test_every_metric_is_registered_with_prefix_type_and_model_label():
    metrics = Metrics(MODEL)
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())
                if not f.name.endswith("_created")}  # prometheus_client's per-series creation times
    assert families == {f"dsv4:{name}": kind for name, kind in EXPECTED.items()}
    samples = _samples(metrics)  # asserts model_name on every sample
    for pool in KV_POOLS:
        assert samples[("dsv4:kv_cache_pool_usage_perc", frozenset({("pool", pool)}))] == 0.0
    for kind in ("cache_hit_input", "cache_miss_input", "output"):
        assert samples[("dsv4:cost_usd_total", frozenset({("kind", kind)}))] == 0.0
    assert samples[("dsv4:request_success_total", frozenset({("finished_reason", "tool_calls")}))] == 0.0


def test_instances_have_separate_registries():
    first, second = Metrics(MODEL), Metrics("deepseek-v4-pro")
    first.observe_step(_step())
    assert _value(first, "num_preemptions_total") == 1
    assert _value(second, "num_preemptions_total") == 0
    assert b'model_name="deepseek-v4-pro"' in second.render() and b"deepseek-v4-flash" not in second.render()


def test_observe_step_sets_gauges_and_moves_counters():
    metrics = Metrics(MODEL)
    metrics.observe_step(_step())
    metrics.observe_step(_step(num_running=1, kv_cache_usage=0.9, pool_usage={"c4": 0.75},
                               prefix_cache_misses={"partial_unit": 28, "evicted": 100}))
    assert _value(metrics, "num_requests_running") == 1
    assert _value(metrics, "num_requests_waiting") == 2
    assert _value(metrics, "kv_cache_usage_perc") == 0.9
    assert _value(metrics, "kv_cache_pool_usage_perc", pool="c4") == 0.75
    assert _value(metrics, "kv_cache_pool_usage_perc", pool="window") == 0.1  # kept from the first step
    assert _value(metrics, "prompt_tokens_total") == 512
    assert _value(metrics, "generation_tokens_total") == 6
    assert _value(metrics, "num_preemptions_total") == 2
    assert _value(metrics, "prefix_cache_queries_total") == 512
    assert _value(metrics, "prefix_cache_hits_total") == 256
    assert _value(metrics, "prefix_cache_misses_total", reason="partial_unit") == 128
    assert _value(metrics, "prefix_cache_misses_total", reason="evicted") == 100
    assert _value(metrics, "iteration_tokens_total_count") == 2
    assert _value(metrics, "iteration_tokens_total_sum") == 600
    assert _value(metrics, "iteration_tokens_total_bucket", le="500.0") == 2
    assert _value(metrics, "iteration_tokens_total_bucket", le="200.0") == 0


def test_speculative_decoding_counters_with_vllm_names():
    metrics = Metrics(MODEL)
    metrics.observe_step(_step(spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=5,
                               spec_accepted_per_position=[3, 2, 0]))
    metrics.observe_step(_step(spec_num_drafts=1, spec_num_draft_tokens=3, spec_num_accepted_tokens=1,
                               spec_accepted_per_position=[1, 0, 0]))
    assert _value(metrics, "spec_decode_num_drafts_total") == 5
    assert _value(metrics, "spec_decode_num_draft_tokens_total") == 15
    assert _value(metrics, "spec_decode_num_accepted_tokens_total") == 6
    assert _value(metrics, "spec_decode_num_accepted_tokens_per_pos_total", position="0") == 4
    assert _value(metrics, "spec_decode_num_accepted_tokens_per_pos_total", position="1") == 2
    with pytest.raises(ValueError, match="spec_num_accepted_tokens"):
        metrics.observe_step(_step(spec_num_draft_tokens=1, spec_num_accepted_tokens=2))


def test_prefix_cache_checkpoint_series():
    metrics = Metrics(MODEL)
    # Zero-valued series exist before the first event; no label value is exported that the
    # engine never produces (the old `preempted` miss reason is gone).
    assert _value(metrics, "prefix_cache_evictions_total", reason="window", kind="superseded") == 0
    assert _value(metrics, "prefix_cache_load_failures_total", reason="corrupt") == 0
    assert ("dsv4:prefix_cache_misses_total", frozenset({("reason", "preempted")})) not in _samples(metrics)
    for _ in range(2):
        metrics.observe_step(_step(prefix_cache_hits_by_tier={"device": 100, "disk": 28},
                                   prefix_cache_evictions={("window", "superseded"): 3, ("c4", "leaf"): 1},
                                   prefix_cache_load_failures={"torn": 1},
                                   prefix_cache_checkpoints={"device": 7, "host": 2, "disk": 5},
                                   prefix_cache_checkpoint_bytes={"window": 4096, "c4": 512, "disk": 9000}))
    assert _value(metrics, "prefix_cache_tier_hits_total", tier="device") == 200
    assert _value(metrics, "prefix_cache_tier_hits_total", tier="disk") == 56
    assert _value(metrics, "prefix_cache_evictions_total", reason="window", kind="superseded") == 6
    assert _value(metrics, "prefix_cache_evictions_total", reason="c4", kind="leaf") == 2
    assert _value(metrics, "prefix_cache_load_failures_total", reason="torn") == 2
    assert _value(metrics, "prefix_cache_checkpoints", tier="host") == 2  # gauges: the latest state
    assert _value(metrics, "prefix_cache_checkpoint_bytes", pool="window") == 4096
    assert _value(metrics, "prefix_cache_checkpoint_bytes", pool="disk") == 9000
    with pytest.raises(ValueError, match="reason, kind"):
        check_step_stats(_step(prefix_cache_evictions={"window": 1}))


def test_observe_step_takes_only_the_engines_step_stats():
    metrics = Metrics(MODEL)
    metrics.observe_step(StepStats(num_running=4, num_waiting=0, kv_cache_usage=0.25))
    assert _value(metrics, "num_requests_running") == 4
    assert _value(metrics, "iteration_tokens_total_count") == 0  # idle steps are not observed

    @dataclass
    class LookAlike:  # same field names, not the engine's type: no duck-typed matching
        num_running: int
        num_waiting: int
        kv_cache_usage: float

    for wrong in (LookAlike(5, 1, 0.3), {"num_running": 5, "num_waiting": 1, "kv_cache_usage": 0.3}, [5, 1, 0.3]):
        with pytest.raises(ValueError, match="engine.outputs.StepStats"):
            metrics.observe_step(wrong)
    assert _value(metrics, "num_requests_running") == 4


def test_observe_finished_fills_latency_token_and_cost_series():
    metrics = Metrics(MODEL)
    cost = CostBreakdown(cache_hit_input_usd=0.001, cache_miss_input_usd=0.002, output_usd=0.004)
    metrics.observe_finished(_timings(), cost)
    metrics.observe_finished(_timings(finish_reason="length"), cost)
    assert _value(metrics, "request_success_total", finished_reason="stop") == 1
    assert _value(metrics, "request_success_total", finished_reason="length") == 1
    assert _value(metrics, "e2e_request_latency_seconds_sum") == pytest.approx(6.0)
    assert _value(metrics, "request_queue_time_seconds_sum") == pytest.approx(1.0)
    assert _value(metrics, "time_to_first_token_seconds_sum") == pytest.approx(2.0)
    assert _value(metrics, "request_prefill_time_seconds_sum") == pytest.approx(1.0)
    assert _value(metrics, "request_decode_time_seconds_sum") == pytest.approx(4.0)
    assert _value(metrics, "request_time_per_output_token_seconds_sum") == pytest.approx(1.0)  # 2 s / 4, twice
    assert _value(metrics, "inter_token_latency_seconds_count") == 8
    assert _value(metrics, "time_to_first_token_seconds_bucket", le="1.0") == 2
    assert _value(metrics, "time_to_first_token_seconds_bucket", le="0.75") == 0
    assert _value(metrics, "request_prompt_tokens_sum") == 2000
    assert _value(metrics, "request_generation_tokens_bucket", le="5.0") == 2
    assert _value(metrics, "tokens_total", kind="cache_hit_input") == 1200
    assert _value(metrics, "tokens_total", kind="cache_miss_input") == 800
    assert _value(metrics, "tokens_total", kind="output") == 10
    assert _value(metrics, "cost_usd_total", kind="output") == pytest.approx(0.008)
    assert _value(metrics, "cost_usd_total", kind="cache_miss_input") == pytest.approx(0.004)


def test_request_aborted_in_queue_only_counts_e2e():
    metrics = Metrics(MODEL)
    metrics.observe_finished(RequestTimings(arrival_time=1.0, finished_time=1.5, finish_reason="abort",
                                            num_prompt_tokens=10))
    assert _value(metrics, "request_success_total", finished_reason="abort") == 1
    assert _value(metrics, "e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "time_to_first_token_seconds_count") == 0
    assert _value(metrics, "request_queue_time_seconds_count") == 0
    assert _value(metrics, "tokens_total", kind="cache_miss_input") == 10


def test_tool_parse_errors_by_kind():
    metrics = Metrics(MODEL)
    metrics.count_tool_parse_error("bad_json")
    metrics.count_tool_parse_error("bad_json")
    assert _value(metrics, "tool_parse_errors_total", kind="bad_json") == 2
    with pytest.raises(ValueError, match="kind"):
        metrics.count_tool_parse_error("Bad JSON!")


@pytest.mark.parametrize("overrides, message", [
    (dict(pool_usage={"swa": 0.1}), "unknown pool 'swa'"),
    (dict(kv_cache_usage=1.5), "kv_cache_usage"),
    (dict(num_running=-1), "num_running"),
    (dict(num_preemptions=True), "num_preemptions"),
    (dict(prefix_cache_hits=200, prefix_cache_misses={"cold": 100}), "must not exceed prefix_cache_queries"),
    (dict(prefix_cache_misses={"Cold Start": 1}), "reason"),
])
def test_bad_step_stats_raise_value_error_and_record_nothing(overrides, message):
    metrics = Metrics(MODEL)
    with pytest.raises(ValueError, match=message):
        check_step_stats(_step(**overrides))
    with pytest.raises(ValueError, match=message):
        metrics.observe_step(_step(**overrides))
    assert _value(metrics, "num_requests_running") == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(first_token_time=10.2), "first_token_time .* earlier"),
    (dict(finished_time=9.0), "finished_time .* earlier"),
    (dict(num_cached_tokens=2000), "num_cached_tokens"),
    (dict(finish_reason=""), "finish_reason"),
    (dict(first_scheduled_time=None), "needs first_scheduled_time"),
    (dict(inter_token_latencies=(0.1, -0.1)), "inter_token_latencies"),
    (dict(arrival_time=float("nan")), "arrival_time"),
])
def test_bad_request_timings_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        _timings(**overrides)


def test_model_name_and_limits_are_validated():
    with pytest.raises(ValueError, match="model_name"):
        Metrics("")
    with pytest.raises(ValueError, match="max_model_len"):
        Metrics(MODEL, max_model_len=-5)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stats_logger_line_covers_the_window_since_the_last_line():
    clock = FakeClock()
    logger = StatsLogger(interval_s=5.0, clock=clock)
    logger.record(_step())
    clock.now += 2.0
    logger.record(_step(num_running=7, num_waiting=0, kv_cache_usage=0.5,
                        pool_usage={"window": 0.25, "state": 0.25, "c4": 0.625, "c128": 0.0}))
    assert logger.maybe_format() is None  # 2 s < 5 s
    clock.now += 3.0
    line = logger.maybe_format()
    assert line == ("Avg prompt throughput: 102.4 tokens/s, Avg generation throughput: 1.2 tokens/s, "
                    "Running: 7 reqs, Waiting: 0 reqs, "
                    "KV cache usage: 50.0% (window 25.0%, state 25.0%, c4 62.5%, c128 0.0%), "
                    "Prefix cache hit rate: 50.0%")
    clock.now += 5.0
    assert logger.maybe_format().startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0")
    assert logger.format_line().endswith("Prefix cache hit rate: n/a")


def test_stats_logger_before_any_step_and_bad_interval():
    assert "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%," in StatsLogger(clock=FakeClock()).format_line()
    with pytest.raises(ValueError, match="interval_s"):
        StatsLogger(interval_s=0)
