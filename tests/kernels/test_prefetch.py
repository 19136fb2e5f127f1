"""L2 weight prefetch: which weight each linear layer prefetches, the knob, and (GPU) that it
changes no value."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.kernels.prefetch import (VARIANTS, WeightPrefetcher, chain_prefetches, from_env,
                                      prefetch_l2, streams_in_order)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Recorder:
    """Stands in for WeightPrefetcher: records what a forward pass asks for."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (id of the weight, rows)
        self.joins = 0

    def fetch(self, weight: torch.Tensor, tokens: int) -> None:
        self.calls.append((id(weight), tokens))

    def join(self) -> None:
        self.joins += 1


def test_each_linear_prefetches_the_next_one_in_forward_order():
    llm = LLM("tiny-llama", load_format="dummy", device="cpu", dtype="float32",
              enforce_eager=True, max_num_seqs=4)
    model = llm.engine.executor.runner.model
    order = streams_in_order(model)
    n_layers = len(model.layers)
    assert len(order) == 4 * n_layers + 1 and order[-1][0] is model.lm_head
    rec = Recorder()
    chain_prefetches(model, rec)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with_chain = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], params)
    # 3 forward passes (prefill of 5 rows, then 2 decode rows of 1); in each, every linear
    # layer but the LM head asks for its successor's weight with its row count
    expected = [(id(w), rows) for rows in (5, 1, 1) for _, w in order[1:]]
    assert rec.calls == expected and rec.joins == 3
    chain_prefetches(model, None)
    assert all(m.prefetch_next is None for m, _ in order[:-1]) and model.prefetcher is None
    plain = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], params)
    assert with_chain[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert len(rec.calls) == len(expected)  # unchained: no more calls


def test_env_knob(monkeypatch):
    monkeypatch.delenv("KESTREL_L2_PREFETCH", raising=False)
    assert from_env()[0] == 0  # off unless asked for
    monkeypatch.setenv("KESTREL_L2_PREFETCH", "12.5,bulk")
    assert from_env() == (12.5, "bulk")
    for bad in ("x", "-1", "8,nope"):
        monkeypatch.setenv("KESTREL_L2_PREFETCH", bad)
        with pytest.raises(ValueError, match="KESTREL_L2_PREFETCH"):
            from_env()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefetch_changes_no_value_in_a_graph(variant):
    """GEMVs with each prefetch variant on a side stream inside a CUDA graph: outputs bitwise
    equal to plain ones, the weights untouched."""
    from kestrel.layers.linear import dense_linear

    dev = torch.device("cuda")
    ws = [torch.randn(n, 4096, device=dev, dtype=torch.bfloat16) for n in (6144, 4096, 28672)]
    before = [w.clone() for w in ws]
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    want = [dense_linear(x, w) for w in ws]
    pf = WeightPrefetcher(dev, 8 << 20, variant, max_tokens=1)

    def step():
        outs = []
        for i, w in enumerate(ws):
            outs.append(dense_linear(x, w))
            pf.fetch(ws[(i + 1) % len(ws)], 1)
        pf.join()
        return outs

    step()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    prefetch_l2(ws[0], 1 << 20, variant)  # eager, on the current stream
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, want))
    assert all(torch.equal(a, b) for a, b in zip(ws, before))
