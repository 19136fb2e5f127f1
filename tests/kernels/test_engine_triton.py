"""The engine on the Triton attention backend (CUDA, or Triton's interpreter on a CPU) against
the torch backend: the path the GPU runs, end to end in CI."""

from __future__ import annotations

import pytest

from kestrel.attention.triton_backend import TritonAttention
from kestrel.engine.llm import LLM
from kestrel.sampling_params import SamplingParams
from tests.kernels.attention_cases import DEV


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_on_the_triton_backend_matches_the_torch_backend(kv_cache_dtype, monkeypatch):
    """Three prompts in 32-token chunks beside decode rows: the last layer attends through
    ``forward_kept`` (the sampled last rows by the decode kernel, none for a middle chunk,
    every row when a request wants prompt logprobs). Tokens, logprobs and prompt logprobs as
    on the torch backend (float32, so up to the kernels' float32 rounding), with the model's
    KV cache and with an FP8 one."""
    kept: list[list[int] | None] = []
    real = TritonAttention.forward_kept

    def spy(self, *a, **kw):
        kept.append(a[6].seqs_cpu)  # keep
        return real(self, *a, **kw)

    monkeypatch.setattr(TritonAttention, "forward_kept", spy)
    prompts = [{"prompt_token_ids": [(m * i) % 500 + 1 for i in range(n)]}
               for m, n in ((7, 40), (11, 30), (13, 60))]
    plain = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, ignore_eos=True)
    params = [plain, SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                    prompt_logprobs=1, ignore_eos=True), plain]
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM("tiny-llama", load_format="dummy", dtype="float32", device=DEV,
                  attention_backend=backend, max_num_batched_tokens=32, enforce_eager=True,
                  kv_cache_dtype=kv_cache_dtype)
        outs[backend] = llm.generate(prompts, params)
    # a middle chunk alone; prompt-logprob rows; two last rows beside a middle chunk; three
    # (on the CPU: [[], None, None, [0, 1], [0, 1, 2]])
    assert [] in kept and None in kept and [0, 1] in kept and [0, 1, 2] in kept
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for x, y in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(x[t] == pytest.approx(y[t], abs=1e-4) for t in x)
    got, want = outs["triton"][1].prompt_logprobs, outs["torch"][1].prompt_logprobs
    assert len(got) == len(want) == 30
    for x, y in zip(got[1:], want[1:]):
        assert x.keys() == y.keys() and all(x[t] == pytest.approx(y[t], abs=1e-4) for t in x)
