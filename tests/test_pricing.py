"""Price table: cost arithmetic per token kind, peak/off-peak windows, file loading and its errors."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from server.pricing import (
    CostBreakdown,
    ModelPrices,
    PeakWindow,
    PriceTable,
    TokenPrices,
    load_price_table,
)

UTC = timezone.utc
# 2026-10-05 is a Monday.
MONDAY_OFF_PEAK = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)
MONDAY_PEAK = datetime(2026, 10, 5, 2, 30, tzinfo=UTC)
SATURDAY_PEAK_HOUR = datetime(2026, 10, 10, 2, 30, tzinfo=UTC)


def test_default_flash_off_peak_cost_per_kind():
    cost = PriceTable.default().cost("deepseek-v4-flash", 1_000_000, 2_000_000, 500_000, MONDAY_OFF_PEAK)
    assert cost.cache_hit_input_usd == pytest.approx(0.007)
    assert cost.cache_miss_input_usd == pytest.approx(0.44)
    assert cost.output_usd == pytest.approx(0.33)
    assert cost.total_usd == pytest.approx(0.777)
    assert cost.is_peak is False


def test_default_pro_peak_is_double_off_peak():
    table = PriceTable.default()
    peak = table.cost("deepseek-v4-pro", 1_000_000, 1_000_000, 1_000_000, MONDAY_PEAK)
    off = table.cost("deepseek-v4-pro", 1_000_000, 1_000_000, 1_000_000, MONDAY_OFF_PEAK)
    assert (peak.cache_hit_input_usd, peak.cache_miss_input_usd, peak.output_usd) == pytest.approx((0.044, 1.32, 3.96))
    assert (off.cache_hit_input_usd, off.cache_miss_input_usd, off.output_usd) == pytest.approx((0.022, 0.66, 1.98))
    assert peak.is_peak and not off.is_peak


@pytest.mark.parametrize("at, is_peak", [
    (datetime(2026, 10, 5, 0, 59, tzinfo=UTC), False),
    (datetime(2026, 10, 5, 1, 0, tzinfo=UTC), True),
    (datetime(2026, 10, 5, 3, 59, tzinfo=UTC), True),
    (datetime(2026, 10, 5, 4, 0, tzinfo=UTC), False),
    (datetime(2026, 10, 5, 6, 0, tzinfo=UTC), True),
    (datetime(2026, 10, 9, 9, 59, tzinfo=UTC), True),  # Friday
    (datetime(2026, 10, 5, 10, 0, tzinfo=UTC), False),
    (SATURDAY_PEAK_HOUR, False),
    # 10:30 in Beijing (UTC+8) is 02:30 UTC: peak, whatever zone the caller uses.
    (datetime(2026, 10, 5, 10, 30, tzinfo=timezone(timedelta(hours=8))), True),
])
def test_peak_windows_are_utc_half_open_weekday_hours(at, is_peak):
    assert PriceTable.default().cost("deepseek-v4-flash", 0, 0, 1, at).is_peak is is_peak


def test_single_tokens_keep_sub_cent_precision_and_details():
    cost = PriceTable.default().cost("deepseek-v4-flash", 1, 1, 1, MONDAY_OFF_PEAK)
    assert cost.cache_hit_input_usd == pytest.approx(7e-9, abs=1e-12)
    assert cost.details() == {
        "currency": "USD",
        "cache_hit_input": cost.cache_hit_input_usd,
        "cache_miss_input": cost.cache_miss_input_usd,
        "output": cost.output_usd,
        "peak": False,
    }
    assert cost.total_usd == pytest.approx(0.887e-6, abs=1e-12)
    assert CostBreakdown(0.1, 0.2, 0.0).total_usd == 0.3  # rounded, not 0.30000000000000004


@pytest.mark.parametrize("kwargs, name", [
    (dict(hit_tokens=-1, miss_tokens=0, output_tokens=0), "hit_tokens"),
    (dict(hit_tokens=0, miss_tokens=1.5, output_tokens=0), "miss_tokens"),
    (dict(hit_tokens=0, miss_tokens=0, output_tokens=True), "output_tokens"),
])
def test_bad_token_counts_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PriceTable.default().cost("deepseek-v4-flash", at=MONDAY_OFF_PEAK, **kwargs)


def test_naive_datetime_and_unknown_model_are_rejected():
    table = PriceTable.default()
    with pytest.raises(ValueError, match="timezone-aware"):
        table.cost("deepseek-v4-flash", 1, 1, 1, datetime(2026, 10, 5, 2, 0))
    with pytest.raises(ValueError, match="no prices.*deepseek-v4-flash"):
        table.cost("other-model", 1, 1, 1, MONDAY_OFF_PEAK)


def test_flag_overrides_make_the_served_model_flat():
    table = load_price_table(None, "deepseek-v4-flash", cache_miss=1.0)
    peak = table.cost("deepseek-v4-flash", 1_000_000, 1_000_000, 1_000_000, MONDAY_PEAK)
    assert not peak.is_peak
    assert (peak.cache_hit_input_usd, peak.cache_miss_input_usd, peak.output_usd) == pytest.approx((0.007, 1.0, 0.66))
    assert "deepseek-v4-pro" in table  # other models untouched

    custom = load_price_table(None, "my-model", cache_hit=0.1, cache_miss=0.2, output=0.3)
    assert custom.cost("my-model", 10, 10, 10, MONDAY_PEAK).total_usd == pytest.approx(6e-6)
    with pytest.raises(ValueError, match="--price-output"):
        load_price_table(None, "my-model", cache_hit=0.1, cache_miss=0.2)
    with pytest.raises(ValueError, match="served_model_name"):
        load_price_table(None, None, output=0.3)


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_json_file_with_multiplier_and_shared_windows(tmp_path):
    path = _write(tmp_path, "prices.json", {
        "peak_windows": [{"days": ["sat", "sun"], "hours": [0, 24]}],
        "models": {
            "m": {"cache_hit_input": 1, "cache_miss_input": 2, "output": 3, "peak_multiplier": 1.5},
            "flat": {"cache_hit_input": 0, "cache_miss_input": 0, "output": 1},
        },
    })
    table = PriceTable.from_file(path)
    assert table.model_names == ("m", "flat")
    weekend = table.cost("m", 1_000_000, 0, 1_000_000, SATURDAY_PEAK_HOUR)
    assert weekend.is_peak and weekend.total_usd == pytest.approx(1.5 + 4.5)
    assert table.cost("m", 1_000_000, 0, 0, MONDAY_PEAK).total_usd == pytest.approx(1.0)
    assert not table.cost("flat", 0, 0, 1, SATURDAY_PEAK_HOUR).is_peak


def test_yaml_file_with_explicit_peak_and_own_windows(tmp_path):
    path = _write(tmp_path, "prices.yaml", """
models:
  m:
    cache_hit_input: 0.5
    cache_miss_input: 1.0
    output: 2.0
    peak: {cache_hit_input: 5, cache_miss_input: 10, output: 20}
    peak_windows:
      - {days: [Mon], hours: [2, 3]}
""")
    table = load_price_table(path)
    assert table.cost("m", 0, 0, 1_000_000, MONDAY_PEAK).output_usd == pytest.approx(20.0)
    assert table.cost("m", 0, 0, 1_000_000, MONDAY_PEAK + timedelta(hours=1)).output_usd == pytest.approx(2.0)
    assert table.prices_for("m").peak == TokenPrices(5, 10, 20)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"modles": {}}, "unknown keys.*modles"),
    ({"models": {}}, "non-empty mapping"),
    ({"models": {"m": {"cache_hit_input": 1, "output": 1}}}, r"models.m: missing prices \['cache_miss_input'\]"),
    ({"models": {"m": {"cache_hit_input": "1", "cache_miss_input": 1, "output": 1}}},
     "models.m.cache_hit_input must be a finite number"),
    ({"models": {"m": {"cache_hit_input": -1, "cache_miss_input": 1, "output": 1}}}, "must be >= 0"),
    ({"models": {"m": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1, "peak_multiplier": 2}}},
     "peak prices need peak_windows"),
    ({"models": {"m": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1, "peak_multiplier": 2,
                       "peak": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1}}},
      "peak_windows": [{"days": ["mon"], "hours": [1, 2]}]}, "either 'peak' or 'peak_multiplier'"),
    ({"peak_windows": [{"days": ["funday"], "hours": [1, 2]}],
      "models": {"m": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1}}}, "unknown weekdays.*funday"),
    ({"peak_windows": [{"days": ["mon"], "hours": [22, 2]}],
      "models": {"m": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1}}}, r"peak_windows\[0\]: hours"),
    ({"models": {"m": {"cache_hit_input": 1, "cache_miss_input": 1, "output": 1, "outptu": 1}}},
     "unknown keys.*outptu"),
    ([1, 2], "top level must be a mapping"),
])
def test_malformed_files_raise_value_error_naming_the_file_and_place(tmp_path, content, message):
    path = _write(tmp_path, "bad.json", content)
    with pytest.raises(ValueError, match=message) as info:
        PriceTable.from_file(path)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        PriceTable.from_file(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="not valid YAML"):
        PriceTable.from_file(_write(tmp_path, "bad.yml", "models: [unclosed"))


def test_dataclass_invariants():
    with pytest.raises(ValueError, match="together"):
        ModelPrices(base=TokenPrices(1, 1, 1), peak=TokenPrices(2, 2, 2))
    with pytest.raises(ValueError, match="hours"):
        PeakWindow(frozenset({0}), 5, 5)
    with pytest.raises(ValueError, match="weekdays"):
        PeakWindow(frozenset({7}), 1, 2)
    with pytest.raises(ValueError, match="kind"):
        CostBreakdown(0, 0, 0).usd("input")
