"""Server settings (`ServeConfig`, frozen, built by `dsv4 serve`) and the per-app runtime
context (`ServerContext`: engine, metrics, billing, token tables) the handlers share.

Metrics have two feeds and no overlap: the engine's per-step stats (queue and KV gauges, token,
prefix-cache and preemption counters) arrive through `on_engine_step` on the engine thread; a
request's latencies, finish reason and cost arrive through `account` when it ends. `/metrics`
only renders. With `stats_interval` > 0 the app logs `StatsLogger`'s one-line summary that often.

Model names: the served name plus DeepSeek's public names are all answered by the one loaded
model. `deepseek-chat` defaults to thinking off and `deepseek-reasoner` to thinking on; every
other name defaults to thinking on. Requests are billed at the served name's prices (whatever
alias they used); a served name missing from the price table gets `cost: null`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from engine.outputs import StepStats
from server.errors import model_not_found
from server.grammar import GrammarLibrary
from server.limits import PromptEncoder, RequestLimits
from server.metrics import Metrics, StatsLogger
from server.pricing import CostBreakdown, PriceTable
from server.protocol import UsageCounts
from server.token_table import TokenTable
from server.tool_call_replay import ToolCallReplay

logger = logging.getLogger(__name__)

PUBLIC_MODEL_NAMES = ("deepseek-v4-pro", "deepseek-v4-flash", "deepseek-chat", "deepseek-reasoner")
THINKING_DEFAULT_BY_NAME = {"deepseek-chat": False, "deepseek-reasoner": True}
DEFAULT_SERVED_MODEL_NAME = "deepseek-v4-flash"
TOOL_PARSE_ERROR_POLICIES = ("content", "error")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    keep_alive_interval: float = 10.0  # seconds between keep-alives while a request waits
    drain_timeout: float = 30.0  # seconds running requests get to finish at shutdown
    price_table: PriceTable = field(default_factory=PriceTable.default)
    log_level: str = "info"
    stats_interval: float = 5.0  # seconds between one-line stats logs; 0 disables them
    # Unparseable tool-call markup / calls to unknown tools: "content" returns the text as
    # content (with `tool_call_error`), "error" fails the request instead.
    tool_parse_errors: str = "content"
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not isinstance(self.served_model_name, str) or not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings")
        for name in ("keep_alive_interval", "drain_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.tool_parse_errors not in TOOL_PARSE_ERROR_POLICIES:
            raise ValueError(f"tool_parse_errors must be one of {TOOL_PARSE_ERROR_POLICIES}, "
                             f"got {self.tool_parse_errors!r}")
        interval = self.stats_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < float("inf"):
            raise ValueError(f"stats_interval must be >= 0 seconds (0 disables the stats log), got {interval!r}")

    @property
    def model_names(self) -> tuple[str, ...]:
        """The served name first, then the public aliases (no duplicates)."""
        return tuple(dict.fromkeys((self.served_model_name, *PUBLIC_MODEL_NAMES)))

    def thinking_default(self, model: str) -> bool:
        return THINKING_DEFAULT_BY_NAME.get(model, True)


class ServerContext:
    """What handlers share: the engine, the config, metrics and lazily built token tables."""

    def __init__(self, engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.is_draining = False
        self.started_at = time.time()
        self.metrics: Metrics | None = None
        self._token_table: TokenTable | None = None
        self._grammar: GrammarLibrary | None = None
        self._prompt_encoder: PromptEncoder | None = None
        self.system_fingerprint = ""
        self.stats_logger: StatsLogger | None = None
        self._stats_lock = threading.Lock()  # StatsLogger: fed on the engine thread, read on the event loop
        self.tool_call_replay = ToolCallReplay()  # generated tool-call text by call id (prefix-cache hits)
        self._last_line_idle = False

    def on_engine_started(self) -> None:
        if self.engine.tokenizer is None:
            raise RuntimeError("the checkpoint has no tokenizer.json; `dsv4 serve` needs one for text I/O")
        self.metrics = Metrics(self.config.served_model_name, max_model_len=self.engine.max_model_len,
                               max_num_batched_tokens=self.engine.config.max_num_batched_tokens)
        if self.config.stats_interval > 0:
            self.stats_logger = StatsLogger(self.config.stats_interval)
        digest = hashlib.sha256(f"{self.config.served_model_name}:{self.engine.model_config!r}".encode())
        self.system_fingerprint = f"fp_{digest.hexdigest()[:10]}_dsv4"
        self._token_table = TokenTable(self.engine.tokenizer)  # once, at startup, not in a request
        self._prompt_encoder = PromptEncoder(self.engine.tokenizer,
                                             max(len(data) for data in self._token_table.token_bytes))

    # ---- models --------------------------------------------------------------------------

    def resolve_model(self, model: str) -> str:
        if model not in self.config.model_names:
            raise model_not_found(model, list(self.config.model_names))
        return model

    # ---- prompts -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], param: str) -> list[int]:
        """Prompt ids within `limits.max_prompt_tokens` and the context (400 naming `param`
        otherwise); call it off the event loop (it runs the tokenizer)."""
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(self.engine.tokenizer,
                                                 max(len(data) for data in self.token_table.token_bytes))
        max_model_len = self.engine.max_model_len
        return self._prompt_encoder.encode(prompt, self.config.limits.prompt_token_limit(max_model_len),
                                           max_model_len, param)

    # ---- token tables and grammars (shared by all requests; the grammar library on first use)

    @property
    def token_table(self) -> TokenTable:
        if self._token_table is None:
            self._token_table = TokenTable(self.engine.tokenizer)
        return self._token_table

    @property
    def grammar(self) -> GrammarLibrary:
        if self._grammar is None:
            model_vocab = getattr(self.engine.model_config, "vocab_size", None)
            self._grammar = GrammarLibrary(self.token_table, self.engine.tokenizer.control_ids, model_vocab)
        return self._grammar

    # ---- billing and metrics -------------------------------------------------------------

    def bill(self, hit_tokens: int, miss_tokens: int, output_tokens: int) -> CostBreakdown | None:
        prices = self.config.price_table
        if self.config.served_model_name not in prices:
            return None
        return prices.cost(self.config.served_model_name, hit_tokens, miss_tokens, output_tokens,
                           datetime.now(timezone.utc))

    def account(self, progress: list, reasons: list[str], counts: UsageCounts | None,
                api: str = "chat_completions") -> CostBreakdown | None:
        """Bill `counts` (None: nothing billable, e.g. the client left) and record one metrics
        sample per engine request; the cost goes with the last one so it is counted once. `api`
        counts the request and its cost by API."""
        cost = None if counts is None else self.bill(
            counts.cache_hit_tokens, counts.cache_miss_tokens, counts.completion_tokens)
        if self.metrics is not None:
            self.metrics.observe_api_request(api, cost)
            for i, (choice_progress, reason) in enumerate(zip(progress, reasons)):
                timings = choice_progress.timings(reason)
                if timings is not None:
                    self.metrics.observe_finished(timings, cost if i == len(progress) - 1 else None)
        return cost

    def on_engine_step(self, stats: StepStats) -> None:
        """The engine's per-step stats (called on the engine thread): the only feed of the
        scheduler gauges and the token, prefix-cache and preemption counters."""
        if self.metrics is None:
            return
        try:
            self.metrics.observe_step(stats)  # checks the record first
        except ValueError as err:  # an inconsistent record must not stop the engine loop
            logger.warning("engine step stats not recorded: %s", err)
            return
        if self.stats_logger is not None:
            with self._stats_lock:
                self.stats_logger.record(stats)

    def log_stats(self) -> None:
        """Log the one-line summary of the window since the previous line. Repeated idle lines
        go to DEBUG so an idle daemon does not fill its log."""
        if self.stats_logger is None:
            return
        with self._stats_lock:
            idle = self.stats_logger.window_is_idle
            line = self.stats_logger.format_line()
        logger.log(logging.DEBUG if idle and self._last_line_idle else logging.INFO, "%s", line)
        self._last_line_idle = idle

    async def log_stats_periodically(self) -> None:
        """`log_stats` every `stats_interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.config.stats_interval)
            self.log_stats()

    def count_tool_parse_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.count_tool_parse_error(kind)
