"""The whole model on the Triton kernels (``DSV4_KERNELS=triton``, interpreted on CPU) decodes
the same greedy tokens as the torch path, with the model-dtype and the FP8 KV cache, and with
activations rounded to FP8 before the FP8-weight GEMMs (``fp8_activations``).

Two prompts: one token, and 75 tokens (18 compressed C4 entries: past the indexer's top-16, so
the sparse selection matters), three greedy tokens each, through ``LLM`` (chunked prefill at 64
tokens, so a chunk also reads an earlier chunk's keys from the pools). The Triton run happens in
a fresh interpreter with TRITON_INTERPRET=1 (see tests_util)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests_util import REPO

SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels.sink_attention import INTERPRETED
assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
llm = LLM(sys.argv[1], kv_cache_dtype=sys.argv[2], max_num_batched_tokens=64, fp8_activations=sys.argv[3] == "1")
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (1, 75)]
outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
print(json.dumps([o.token_ids for o in outs]))
"""


def _torch_path(model_dir: str, kv_cache_dtype: str, fp8_activations: bool) -> list[list[int]]:
    llm = LLM(model_dir, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64, fp8_activations=fp8_activations)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (1, 75)]
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]


@pytest.mark.parametrize("kv_cache_dtype,fp8_activations", [("auto", False), ("fp8", False), ("fp8", True)])
def test_triton_path_greedy_equals_torch_path(tiny_dir, kv_cache_dtype, fp8_activations):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "DSV4_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_dir, kv_cache_dtype, str(int(fp8_activations))],
                          cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    triton_tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    assert triton_tokens == _torch_path(tiny_dir, kv_cache_dtype, fp8_activations)


def test_fp8_activations_round_exactly_the_fp8_projections(tiny_dir):
    """The loader marks the layers whose checkpoint weight is FP8, and only those; they run the
    GEMM on FP8-rounded activations."""
    from engine.model.layers import Linear
    from kernels.quant import act_quant_fp8

    plain, quant = (LLM(tiny_dir, fp8_activations=f).engine.runner.model for f in (False, True))
    marked = {n for n, m in quant.named_modules() if isinstance(m, Linear) and m.act_quant}
    assert "layers.0.attn.wq_a" in marked and "layers.1.attn.compressor.wkv" not in marked
    assert not any(m.act_quant for m in plain.modules() if isinstance(m, Linear))
    q, p = quant.get_submodule("layers.0.attn.wq_a"), plain.get_submodule("layers.0.attn.wq_a")
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(q(x), p(act_quant_fp8(x, 128))) and not torch.equal(q(x), p(x))
