"""Token prices and the USD cost of one request, billed the DeepSeek way.

Three kinds of token are priced separately: prompt tokens served from the context cache
(`cache_hit_input`), the other prompt tokens (`cache_miss_input`) and generated tokens (`output`).
A model may have peak prices that apply inside weekday/hour windows in UTC. Prices are USD per
1M tokens. This module only computes; metrics and the usage JSON consume `CostBreakdown`.

Defaults: DeepSeek's V4 list price from 2026-08-16 16:00 UTC (peak/off-peak billing), the latest
list that prices the V4 generation itself (from 2026-09-10 Flash names bill at V4.1-Flash rates).
Off-peak = half of peak; peak = 01:00-04:00 and 06:00-10:00 UTC, Monday to Friday. DeepSeek also
exempts Chinese public holidays from peak; this table does not model holidays.
"""

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

PRICE_KINDS = ("cache_hit_input", "cache_miss_input", "output")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
USD_DECIMALS = 10  # a single token at 0.0028 USD/1M is 2.8e-9 USD; keep that visible

_MODEL_KEYS = set(PRICE_KINDS) | {"peak", "peak_multiplier", "peak_windows"}
_TOP_KEYS = {"models", "peak_windows"}
_WINDOW_KEYS = {"days", "hours"}


def _require_price(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (USD per 1M tokens), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _require_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class TokenPrices:
    """USD per 1M tokens for each kind of token."""

    cache_hit_input: float
    cache_miss_input: float
    output: float

    def __post_init__(self):
        for kind in PRICE_KINDS:
            object.__setattr__(self, kind, _require_price(getattr(self, kind), kind))

    def scaled(self, factor: float) -> "TokenPrices":
        return TokenPrices(*(getattr(self, kind) * factor for kind in PRICE_KINDS))


@dataclass(frozen=True)
class PeakWindow:
    """Hours [start_hour, end_hour) in UTC on the given weekdays (0 = Monday)."""

    weekdays: frozenset[int]
    start_hour: int
    end_hour: int

    def __post_init__(self):
        if not self.weekdays or not all(isinstance(d, int) and 0 <= d <= 6 for d in self.weekdays):
            raise ValueError(f"weekdays must be a non-empty set of 0..6 (0 = Monday), got {self.weekdays!r}")
        for name in ("start_hour", "end_hour"):
            _require_count(getattr(self, name), name)
        # NOTE: no wrap past midnight; a window over midnight is written as two windows.
        if not 0 <= self.start_hour < self.end_hour <= 24:
            raise ValueError(
                f"hours must satisfy 0 <= start < end <= 24, got [{self.start_hour}, {self.end_hour}]"
            )

    def contains(self, at_utc: datetime) -> bool:
        return at_utc.weekday() in self.weekdays and self.start_hour <= at_utc.hour < self.end_hour


@dataclass(frozen=True)
class ModelPrices:
    """Prices of one served model: `base` off peak (always, without windows), `peak` inside windows."""

    base: TokenPrices
    peak: TokenPrices | None = None
    peak_windows: tuple[PeakWindow, ...] = ()

    def __post_init__(self):
        if (self.peak is None) != (not self.peak_windows):
            raise ValueError("peak prices and peak_windows must be given together")

    def is_peak(self, at_utc: datetime) -> bool:
        return any(window.contains(at_utc) for window in self.peak_windows)

    def prices_at(self, at_utc: datetime) -> TokenPrices:
        return self.peak if self.peak is not None and self.is_peak(at_utc) else self.base


@dataclass(frozen=True)
class CostBreakdown:
    """USD cost of one request per kind of token (rounded to USD_DECIMALS)."""

    cache_hit_input_usd: float
    cache_miss_input_usd: float
    output_usd: float
    is_peak: bool = False

    @property
    def total_usd(self) -> float:
        return round(self.cache_hit_input_usd + self.cache_miss_input_usd + self.output_usd, USD_DECIMALS)

    def usd(self, kind: str) -> float:
        if kind not in PRICE_KINDS:
            raise ValueError(f"kind must be one of {PRICE_KINDS}, got {kind!r}")
        return getattr(self, f"{kind}_usd")

    def details(self) -> dict:
        """`usage.cost_details` in responses; `usage.cost` is `total_usd`, a plain number (the
        convention of other gateways, which typed clients such as litellm read)."""
        return {
            "currency": "USD",
            "cache_hit_input": self.cache_hit_input_usd,
            "cache_miss_input": self.cache_miss_input_usd,
            "output": self.output_usd,
            "peak": self.is_peak,
        }


class PriceTable:
    """Prices per served model name; `cost()` bills one request at a point in time."""

    def __init__(self, models: Mapping[str, ModelPrices]):
        for name, prices in models.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"model names must be non-empty strings, got {name!r}")
            if not isinstance(prices, ModelPrices):
                raise ValueError(f"prices for {name!r} must be ModelPrices, got {type(prices).__name__}")
        self._models = dict(models)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def prices_for(self, model: str) -> ModelPrices:
        if model not in self._models:
            raise ValueError(f"model {model!r} has no prices; known: {sorted(self._models)}")
        return self._models[model]

    def cost(self, model: str, hit_tokens: int, miss_tokens: int, output_tokens: int, at: datetime) -> CostBreakdown:
        """Bill `hit_tokens` cache-hit input, `miss_tokens` cache-miss input and `output_tokens`
        generated tokens at the price in force at `at` (timezone-aware)."""
        counts = {
            "cache_hit_input": _require_count(hit_tokens, "hit_tokens"),
            "cache_miss_input": _require_count(miss_tokens, "miss_tokens"),
            "output": _require_count(output_tokens, "output_tokens"),
        }
        if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"at must be a timezone-aware datetime, got {at!r}")
        prices = self.prices_for(model)
        at_utc = at.astimezone(timezone.utc)
        unit = prices.prices_at(at_utc)
        usd = {kind: round(counts[kind] * getattr(unit, kind) / 1e6, USD_DECIMALS) for kind in PRICE_KINDS}
        return CostBreakdown(
            cache_hit_input_usd=usd["cache_hit_input"],
            cache_miss_input_usd=usd["cache_miss_input"],
            output_usd=usd["output"],
            is_peak=prices.peak is not None and prices.is_peak(at_utc),
        )

    def with_override(
        self,
        model: str,
        cache_hit: float | None = None,
        cache_miss: float | None = None,
        output: float | None = None,
    ) -> "PriceTable":
        """A copy where `model` bills flat (no peak) at the given prices; a price left out keeps
        the model's current off-peak price, so an unknown model needs all three."""
        given = {"cache_hit_input": cache_hit, "cache_miss_input": cache_miss, "output": output}
        current = self._models.get(model)
        if current is None and any(value is None for value in given.values()):
            missing = [f"--price-{k.replace('_input', '').replace('_', '-')}" for k, v in given.items() if v is None]
            raise ValueError(f"model {model!r} has no prices to fall back on; also pass {', '.join(missing)}")
        flat = TokenPrices(
            **{kind: getattr(current.base, kind) if value is None else value for kind, value in given.items()}
        )
        return PriceTable({**self._models, model: ModelPrices(base=flat)})

    @classmethod
    def default(cls) -> "PriceTable":
        return cls(_default_models())

    @classmethod
    def from_file(cls, path: str | Path) -> "PriceTable":
        """Load a JSON file, or YAML for `.yaml`/`.yml` (needs pyyaml). Replaces the defaults."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"price table {path}: cannot read ({exc.strerror or exc})") from exc
        if path.suffix.lower() in (".yaml", ".yml"):
            data = _parse_yaml(text, source=f"price table {path}")
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"price table {path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=f"price table {path}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "price table") -> "PriceTable":
        try:
            return cls(_parse_models(data))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def load_price_table(
    path: str | Path | None,
    served_model_name: str | None = None,
    cache_hit: float | None = None,
    cache_miss: float | None = None,
    output: float | None = None,
) -> PriceTable:
    """`--price-table FILE` (or the defaults), then `--price-cache-hit/-miss/--price-output`
    applied to the served model."""
    table = PriceTable.default() if path is None else PriceTable.from_file(path)
    if cache_hit is None and cache_miss is None and output is None:
        return table
    if not served_model_name:
        raise ValueError("served_model_name is required when --price-* overrides are given")
    return table.with_override(served_model_name, cache_hit, cache_miss, output)


def _default_models() -> dict[str, ModelPrices]:
    weekdays = frozenset(range(5))
    windows = (PeakWindow(weekdays, 1, 4), PeakWindow(weekdays, 6, 10))
    flash = TokenPrices(cache_hit_input=0.007, cache_miss_input=0.22, output=0.66)
    pro = TokenPrices(cache_hit_input=0.022, cache_miss_input=0.66, output=1.98)
    return {
        "deepseek-v4-flash": ModelPrices(base=flash, peak=flash.scaled(2), peak_windows=windows),
        "deepseek-v4-pro": ModelPrices(base=pro, peak=pro.scaled(2), peak_windows=windows),
    }


# ---- file parsing ------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml  # optional dependency: only needed for YAML price tables
    except ImportError as exc:
        raise ValueError(f"{source}: YAML needs pyyaml installed; use JSON instead") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None


def _check_keys(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _parse_models(data: Any) -> dict[str, ModelPrices]:
    _check_keys(data, _TOP_KEYS, "top level")
    if "models" not in data or not isinstance(data["models"], dict) or not data["models"]:
        raise ValueError("'models' must be a non-empty mapping of model name -> prices")
    shared_windows = _parse_windows(data.get("peak_windows"), "peak_windows")
    return {
        str(name): _parse_model(entry, shared_windows, f"models.{name}")
        for name, entry in data["models"].items()
    }


def _parse_model(entry: Any, shared_windows: tuple[PeakWindow, ...], where: str) -> ModelPrices:
    _check_keys(entry, _MODEL_KEYS, where)
    base = _parse_prices(entry, where)
    if "peak" in entry and "peak_multiplier" in entry:
        raise ValueError(f"{where}: give either 'peak' or 'peak_multiplier', not both")
    if "peak" in entry:
        _check_keys(entry["peak"], set(PRICE_KINDS), f"{where}.peak")
        peak = _parse_prices(entry["peak"], f"{where}.peak")
    elif "peak_multiplier" in entry:
        factor = _require_price(entry["peak_multiplier"], f"{where}.peak_multiplier")
        peak = base.scaled(factor)
    else:
        return ModelPrices(base=base)
    windows = _parse_windows(entry["peak_windows"], f"{where}.peak_windows") if "peak_windows" in entry else shared_windows
    if not windows:
        raise ValueError(f"{where}: peak prices need peak_windows (on the model or at top level)")
    return ModelPrices(base=base, peak=peak, peak_windows=windows)


def _parse_prices(entry: dict, where: str) -> TokenPrices:
    missing = [kind for kind in PRICE_KINDS if kind not in entry]
    if missing:
        raise ValueError(f"{where}: missing prices {missing}")
    return TokenPrices(**{kind: _require_price(entry[kind], f"{where}.{kind}") for kind in PRICE_KINDS})


def _parse_windows(raw: Any, where: str) -> tuple[PeakWindow, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{where} must be a list of {{days: [mon, ...], hours: [start, end]}}")
    windows = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        _check_keys(item, _WINDOW_KEYS, here)
        days, hours = item.get("days"), item.get("hours")
        if not isinstance(days, list) or not days or not all(isinstance(d, str) for d in days):
            raise ValueError(f"{here}.days must be a non-empty list of {list(WEEKDAYS)}")
        bad = [d for d in days if d.lower() not in WEEKDAYS]
        if bad:
            raise ValueError(f"{here}.days: unknown weekdays {bad}; use {list(WEEKDAYS)}")
        if not isinstance(hours, list) or len(hours) != 2:
            raise ValueError(f"{here}.hours must be [start_hour, end_hour] in UTC, got {hours!r}")
        try:
            windows.append(PeakWindow(frozenset(WEEKDAYS.index(d.lower()) for d in days), hours[0], hours[1]))
        except ValueError as exc:
            raise ValueError(f"{here}: {exc}") from None
    return tuple(windows)
