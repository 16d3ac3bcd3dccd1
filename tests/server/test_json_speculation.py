"""JSON mode with speculative decoding: grammar-constrained requests verify drafts too. Each
verify row is masked as after the drafts before it (the matcher follows them and rolls back), so
greedy outputs equal plain constrained decoding token for token, stay valid JSON, and drafts are
accepted; a grammar processor's state after a verify step is the plain one."""
import json

import pytest
import torch

from demo.demo_data import eval_conversations
from engine.default_model import default_model_dir
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from server.chat_template import THINK_END
from server.grammar import GrammarLibrary, GrammarProcessor
from server.logit_bias import LogitBias
from server.token_table import TokenTable


@pytest.fixture(scope="module")
def demo():
    model_dir = default_model_dir()
    tok = Tokenizer.from_dir(model_dir)
    convs = [c for c in eval_conversations(seed=3, per_kind=12) if c.kind == "json"][:6]
    return model_dir, tok, GrammarLibrary(TokenTable(tok), tok.control_ids), convs


def _run(model_dir, tok, library, convs, **spec):
    core = EngineCore(EngineConfig(model=model_dir, max_num_seqs=8, **spec))
    think_end = tok.token_to_id(THINK_END)
    for i, c in enumerate(convs):
        prompt = tok.encode(c.render(c.prompt_messages(), add_generation_prompt=True))
        procs = [GrammarProcessor(library.json_object(), think_end if c.thinking else None)]
        if i % 2:  # a logit bias in front of the grammar, as the chat endpoint orders them
            procs.insert(0, LogitBias({tok.encode(" ")[0]: -0.5}))
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=80, temperature=0, skip_special_tokens=False,
                                                           logits_processors=procs))
    out, accepted = {i: [] for i in range(len(convs))}, 0
    while core.has_unfinished():
        for o in core.step():
            out[int(o.request_id[1:])] += o.new_token_ids
        accepted += core.last_step_stats.spec_num_accepted_tokens
    return out, accepted


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_json_mode_speculates_and_equals_plain_constrained_decoding(demo, method):
    model_dir, tok, library, convs = demo
    want, _ = _run(model_dir, tok, library, convs)
    got, accepted = _run(model_dir, tok, library, convs, speculative_tokens=2, speculative_method=method)
    assert got == want
    assert accepted > 0
    for ids in want.values():  # the reply after any reasoning, up to EOS, is one JSON object
        assert ids[-1] == tok.eos_id
        reply = tok.decode(ids[:-1]).split(str(THINK_END))[-1]
        assert isinstance(json.loads(reply), dict), reply


def test_mask_drafts_rows_equal_stepwise_masks_and_keep_the_state(demo):
    _, tok, library, _ = demo
    V = tok.vocab_size
    prefix, drafts = tok.encode('{"a": 1'), tok.encode(', "b": 2}')[:3]
    proc = GrammarProcessor(library.json_object())
    rows = torch.zeros(len(drafts) + 1, V)
    assert proc.mask_drafts(prefix, drafts, rows) == len(drafts)
    for i in range(len(drafts) + 1):
        step = GrammarProcessor(library.json_object())
        assert torch.equal(rows[i], step(prefix + drafts[:i], torch.zeros(V))), i
    # The state is still the one after `prefix`: the plain next mask is row 0 again.
    assert torch.equal(proc(prefix, torch.zeros(V)), rows[0])
    # A draft the grammar refuses ends what it follows.
    bad = tok.encode("]]")
    assert proc.mask_drafts(prefix, bad, torch.zeros(len(bad) + 1, V)) == 0
