"""``--compile``: the decode step traces as one graph (``fullgraph=True``: no host sync, no
data-dependent shape, no graph break) and gives the eager engine's tokens and logprobs.

Dynamo's capture is what this checks; Inductor's codegen on top of it is slow on the CI box
(minutes per shape), so the test runs the captured graph with the ``eager`` backend and the
benchmark (bench/engine_throughput.py) measures Inductor."""
import torch

from engine import LLM, SamplingParams
from engine.worker.step_executor import CompiledStep


def test_compiled_decode_equals_eager(tiny_dir):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (1, 5, 130, 300, 520)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    eager = LLM(tiny_dir, max_num_batched_tokens=256).generate(prompts, params)

    llm = LLM(tiny_dir, max_num_batched_tokens=256, compile=True)
    runner = llm.engine.runner
    assert isinstance(runner.step, CompiledStep)
    torch._dynamo.reset()
    runner.step = CompiledStep(runner._logits, backend="eager")
    compiled = llm.generate(prompts, params)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
        assert torch.allclose(torch.tensor([lp.logprob for lp in c.logprobs]),
                              torch.tensor([lp.logprob for lp in e.logprobs]), atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
