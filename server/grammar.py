"""Grammar-constrained decoding with xgrammar: JSON Output, structured outputs, strict tools.

`GrammarLibrary` holds one xgrammar compiler for the served tokenizer (its vocabulary given as
the raw bytes every token id contributes, `TokenTable`) and compiles, with xgrammar's cache:
- `json_object()`: any JSON object (`response_format: json_object`);
- `json_schema(schema)`: `response_format: json_schema` (what `chat.completions.parse` sends);
- `tool_calls(tools, tool_choice)`: DeepSeek-V4's DSML tool-call block (xgrammar's
  `deepseek_v4` structural tag: offered names only, string parameters raw, other values JSON
  of their schema). `auto` leaves the content free until a `<｜DSML｜tool_calls>` opener,
  `required` forces one block of calls, a named choice forces that one function.
`GrammarProcessor` is the per-request logits processor. Its `prepare(output_token_ids)` is called
by the model runner before the forward: the matcher advances and the next-token mask is filled
on a worker thread while the forward runs (xgrammar releases the GIL), so applying it after the
forward costs one masked fill.

Policies:
- Control tokens (every added token: `<｜User｜>`, `<think>`, FIM, ...) are never allowed by a
  JSON grammar; in a tool-call grammar only `｜DSML｜` is (it spells the markup). EOS is allowed
  exactly where the grammar is complete.
- Thinking mode: the reasoning stays free; the grammar starts after `</think>` (the token, or
  the same text spelled in pieces, where the output parser also ends the reasoning). Only EOS
  and `｜DSML｜` are masked in the reasoning, so that a reply always reaches its constrained
  part (or max_tokens) and cannot open an unconstrained tool-call block there.
- JSON may put up to `MAX_WHITESPACE` whitespace characters between tokens (not unbounded).
- A grammar that reached its end allows only EOS. Should the matcher ever reject a token (only
  possible if something bypassed the mask), the processor logs it and allows only EOS.

Where the state lives: the server compiles every constraint (a bad schema is a 400 before the
request is queued) and the processor runs where the logits are, in the engine process. A
processor crosses to it as its recipe (what was compiled, from which arguments), never as
xgrammar objects; the engine process compiles the recipe again with its own library over the
same tokenizer (xgrammar's cache makes a repeated schema free) and keeps the matcher there, so
masks cost no round trip per token.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
import xgrammar as xgr

from server.chat_template import DSML, THINK_END

logger = logging.getLogger(__name__)

# Whitespace between JSON tokens is free but bounded: a weak model must not pad until max_tokens.
MAX_WHITESPACE = 2
THINK_END_BYTES = THINK_END.encode()
_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsv4-grammar")


class GrammarError(ValueError):
    """A schema or tool set the grammar library cannot compile (the client gets a 400)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar plus the control tokens it must never emit."""

    compiled: xgr.CompiledGrammar
    forbidden_ids: tuple[int, ...]
    vocab_size: int
    token_bytes: list[bytes]  # what each token id spells (shared, read-only)
    reasoning_forbidden_ids: tuple[int, ...]  # EOS and ｜DSML｜: the reasoning must reach `</think>`
    recipe: tuple = ()  # (library method name, its arguments): how another process rebuilds it


class GrammarLibrary:
    """Compiles constraints for one tokenizer; shared by all requests (thread-safe)."""

    def __init__(self, table, control_ids, vocab_size: int | None = None):
        vocab_size = max(vocab_size or 0, table.vocab_size)
        info = xgr.TokenizerInfo(list(table.token_bytes), xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=[table.eos_id])
        self.vocab_size = vocab_size
        self.eos_id = table.eos_id
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        dsml_ids = {i for i in control_ids if table.token_bytes[i] == DSML.encode()}
        self._json_forbidden = tuple(sorted(set(control_ids) - {table.eos_id}))
        self._markup_forbidden = tuple(sorted(set(control_ids) - {table.eos_id} - dsml_ids))
        self._reasoning_forbidden = tuple(sorted({table.eos_id} | dsml_ids))
        self._token_bytes = table.token_bytes
        self._lock = threading.Lock()

    def _constraint(self, compile_it, forbidden, recipe: tuple) -> Constraint:
        try:
            with self._lock:  # one compile at a time; repeats are cache hits
                compiled = compile_it()
        except (RuntimeError, ValueError, TypeError) as err:
            raise GrammarError(str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)) from None
        return Constraint(compiled, forbidden, self.vocab_size, self._token_bytes, self._reasoning_forbidden,
                          recipe)

    def rebuild(self, recipe: tuple) -> Constraint:
        """The constraint another library compiled from ``recipe`` (``Constraint.recipe``)."""
        name, args = recipe
        if name not in ("json_schema", "tool_calls"):
            raise GrammarError(f"unknown grammar recipe {name!r}")
        return getattr(self, name)(*args)

    def json_object(self) -> Constraint:
        return self.json_schema({"type": "object"}, strict=False)

    def json_schema(self, schema: dict, strict: bool = True) -> Constraint:
        """`strict`: no properties or items beyond the schema's."""
        return self._constraint(lambda: self._compiler.compile_json_schema(
            schema, strict_mode=strict, max_whitespace_cnt=MAX_WHITESPACE), self._json_forbidden,
            ("json_schema", (schema, strict)))

    def tool_calls(self, tools: list[dict], tool_choice) -> Constraint:
        """`tool_choice`: "auto", "required" or {"type": "function", "function": {"name"}}."""
        def compile_it():
            tag = xgr.get_model_structural_tag("deepseek_v4", tools=tools, tool_choice=tool_choice,
                                               reasoning="disabled", max_whitespace_cnt=MAX_WHITESPACE)
            return self._compiler.compile_structural_tag(tag)
        return self._constraint(compile_it, self._markup_forbidden, ("tool_calls", (tools, tool_choice)))


class GrammarProcessor:
    """Per-request logits processor `(output_token_ids, logits[V]) -> logits[V]` over one
    `Constraint`. Stateful: it follows the tokens generated since its previous call."""

    def __init__(self, constraint: Constraint, think_end_id: int | None = None):
        self._recipe = constraint.recipe
        self._matcher = xgr.GrammarMatcher(constraint.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, constraint.vocab_size)
        self._forbidden = torch.tensor(constraint.forbidden_ids, dtype=torch.long)
        self._reasoning_forbidden = torch.tensor(constraint.reasoning_forbidden_ids, dtype=torch.long)
        self._token_bytes = constraint.token_bytes
        self._think_end_id = think_end_id
        self._in_reasoning = think_end_id is not None
        self._reasoning_tail = b""  # the last bytes of the reasoning, to see a spelled-out `</think>`
        self._num_seen = 0
        self._lost = False
        self._pending: tuple[int, Future] | None = None  # (tokens covered, mask being filled)

    def __reduce__(self):
        # A fresh processor only: one that has seen tokens holds matcher state a recipe lacks.
        if self._num_seen:
            raise TypeError("a GrammarProcessor that has started cannot be moved to another process")
        return _processor_in_this_process, (self._recipe, self._think_end_id)

    @property
    def is_completed(self) -> bool:
        return self._matcher.is_completed()

    def _advance(self, new_tokens: list[int]) -> None:
        for token_id in new_tokens:
            if self._in_reasoning:
                self._end_reasoning_at(token_id)
            elif not self._lost and not self._matcher.is_terminated():
                if not self._matcher.accept_token(token_id):
                    logger.warning("grammar rejected token %d (mask bypassed?); allowing only EOS", token_id)
                    self._lost = True

    def _end_reasoning_at(self, token_id: int) -> None:
        """The output parser ends the reasoning at `</think>` text however it was tokenized;
        so does the constraint (bytes after the marker in the same token go to the grammar)."""
        if token_id == self._think_end_id:
            self._in_reasoning = False
            return
        data = self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""
        text = self._reasoning_tail + data
        at = text.find(THINK_END_BYTES)
        if at == -1:
            self._reasoning_tail = text[-(len(THINK_END_BYTES) - 1):]
            return
        self._in_reasoning = False
        rest = text[at + len(THINK_END_BYTES):]
        if rest and not self._matcher.accept_string(rest):
            logger.warning("grammar rejected the text after </think>; allowing only EOS")
            self._lost = True

    def _fill(self, new_tokens: list[int]) -> None:
        self._advance(new_tokens)
        if not self._in_reasoning and not self._lost:
            self._matcher.fill_next_token_bitmask(self._bitmask)

    def prepare(self, output_token_ids: Sequence[int]) -> None:
        """Start filling the next mask on a worker thread (called before the forward)."""
        if self._pending is not None:
            return
        count = len(output_token_ids)
        new_tokens = list(output_token_ids[self._num_seen:count])  # copied here: the list grows later
        self._num_seen = count
        self._pending = (count, _WORKERS.submit(self._fill, new_tokens))

    def __call__(self, output_token_ids: Sequence[int], logits):
        if self._pending is None or self._pending[0] != len(output_token_ids):
            self._wait()
            self.prepare(output_token_ids)
        self._wait()
        return self._mask(logits)

    def mask_drafts(self, output_token_ids: Sequence[int], drafts: Sequence[int], rows) -> int:
        """Speculative verify rows ``rows [1 + k, V]``: row 0 masked as ``__call__`` would, row i
        as after ``drafts[:i]``, following the drafts through the matcher and rolling it back (the
        state stays at ``output_token_ids``). Returns how many drafts it followed: it stops at one
        the grammar refuses and in states it cannot roll back (reasoning, lost, terminated)."""
        rows[0] = self(output_token_ids, rows[0])
        followed = 0
        for d in drafts:
            if self._in_reasoning or self._lost or self._matcher.is_terminated() \
                    or not self._matcher.accept_token(d):
                break
            followed += 1
            self._fill_mask()
            rows[followed] = self._mask(rows[followed])
        if followed:
            self._matcher.rollback(followed)
            self._fill_mask()  # the current state's mask again (a later call may reuse it)
        return followed

    def _fill_mask(self) -> None:
        if not self._matcher.is_terminated():  # a terminated matcher allows only EOS (`_mask`)
            self._matcher.fill_next_token_bitmask(self._bitmask)

    def _mask(self, logits):
        """``logits`` masked by the current state (the bitmask holds its allowed tokens)."""
        if self._in_reasoning:  # free, but it may neither end the reply nor open a tool-call block
            logits[self._reasoning_forbidden.to(logits.device)] = float("-inf")
            return logits
        if self._lost or self._matcher.is_terminated():
            eos = self._matcher.stop_token_ids[0]
            masked = torch.full_like(logits, float("-inf"))
            masked[eos] = logits[eos]
            return masked
        row = logits.unsqueeze(0)
        xgr.apply_token_bitmask_inplace(row, self._bitmask.to(logits.device), vocab_size=logits.shape[-1])
        logits[self._forbidden.to(logits.device)] = float("-inf")
        return logits

    def _wait(self) -> None:
        if self._pending is not None:
            _, future = self._pending
            self._pending = None
            future.result()


_process_library: GrammarLibrary | None = None
_process_library_lock = threading.Lock()


def _processor_in_this_process(recipe: tuple, think_end_id: int | None) -> GrammarProcessor:
    """Unpickling a processor in the engine process: compile its recipe with this process's
    library, built once over the engine's own tokenizer (the server's vocabulary: same files)."""
    global _process_library
    from engine.engine_process import process_core
    from server.token_table import TokenTable

    with _process_library_lock:
        if _process_library is None:
            core = process_core()
            if core is None or core.tokenizer is None:
                raise RuntimeError("a grammar processor needs the engine process's tokenizer")
            _process_library = GrammarLibrary(TokenTable(core.tokenizer), core.tokenizer.control_ids,
                                              getattr(core.model_config, "vocab_size", None))
    return GrammarProcessor(_process_library.rebuild(recipe), think_end_id)
