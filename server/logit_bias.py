"""`logit_bias`: per-token additive biases on the logits, OpenAI's `{"<token id>": bias}`.

Checked up front (`check_logit_bias`: ids inside the vocabulary, biases in [-100, 100], at
most 300 entries, as OpenAI documents) and applied by `LogitBias`, a per-request logits
processor (engine/worker/sampler.py: `(output_token_ids, logits[V]) -> logits[V]`). A bias of
-100 effectively bans a token, +100 all but forces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.errors import invalid_request

MAX_LOGIT_BIAS = 300  # OpenAI's limit


def check_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """`{"<token id>": bias}` -> {id: bias}; 400 naming the bad entry."""
    if not logit_bias:
        return {}
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise invalid_request(f"logit_bias accepts at most {MAX_LOGIT_BIAS} tokens, got {len(logit_bias)}",
                              "logit_bias")
    biases = {}
    for key, bias in logit_bias.items():
        if not key.isascii() or not key.isdigit() or not 0 <= int(key) < vocab_size:
            raise invalid_request(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key[:32]!r}",
                                  "logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise invalid_request(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")
        biases[int(key)] = float(bias)
    return biases


class LogitBias:
    """Adds fixed biases to a request's logits row (tensors built once, moved on first use)."""

    def __init__(self, biases: dict[int, float]):
        self._ids = torch.tensor(list(biases), dtype=torch.long)
        self._values = torch.tensor(list(biases.values()), dtype=torch.float32)

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self._ids.device != logits.device:
            self._ids, self._values = self._ids.to(logits.device), self._values.to(logits.device)
        return logits.index_add(0, self._ids, self._values.to(logits.dtype))

    def mask_drafts(self, output_token_ids: Sequence[int], drafts: Sequence[int], rows: torch.Tensor) -> int:
        """Speculative verify rows: the same biases on every row (stateless)."""
        for i in range(rows.shape[0]):
            rows[i] = self(output_token_ids, rows[i])
        return len(drafts)
