"""Quantized layers under tensor parallelism (gloo), and loaders that read only their shard."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM
from tests.helpers import max_rel_err, prompt_logits
from tests.parallel.common import LONG, close_checked


def test_fp8_under_tp2(tiny4, tiny_ref):
    """FP8 weights shard exactly (row scales come from whole checkpoint rows); the TP=2 model
    is as close to float32 as the TP=1 FP8 model (row-parallel layers scale activations per
    shard, so the two FP8 runs differ slightly from each other)."""
    one = LLM(str(tiny4), quantization="fp8", fp8_skip_layers=False)
    err1 = max_rel_err(prompt_logits(one, LONG), tiny_ref[2])
    llm = LLM(str(tiny4), quantization="fp8", fp8_skip_layers=False, tensor_parallel_size=2)
    try:
        err2 = max_rel_err(prompt_logits(llm, LONG), tiny_ref[2])
        assert 0 < err2 < 1.5 * err1 + 1e-3
    finally:
        close_checked(llm)


def test_int8_under_tp2(tiny4, tiny_ref):
    """LLM.int8() layers shard exactly: each rank's int8 codes and row scales are the slices of
    one process's (scales from whole checkpoint rows). The TP=2 model is as close to float32 as
    one process's int8 model (row-parallel layers scale activations and find outliers per
    shard, so the two int8 runs differ slightly from each other)."""
    import kestrel.attention.torch_ref  # noqa: F401 - registers "torch"
    from kestrel.attention.base import get_backend_cls
    from kestrel.config import QuantConfig
    from kestrel.loader.hf import iterate_weights, load_model_config
    from kestrel.models.llama import LlamaForCausalLM
    from kestrel.parallel.state import TPGroup

    cfg, q = load_model_config(tiny4), QuantConfig(method="int8")
    models = [LlamaForCausalLM(cfg, torch.float32, get_backend_cls("torch"), q, tp)
              for tp in (TPGroup(), TPGroup(0, 2, None), TPGroup(1, 2, None))]
    for m in models:
        m.load_weights(iterate_weights(tiny4))
    whole = models[0].layers["1"]
    for rank, m in enumerate(models[1:]):
        lay = m.layers["1"]
        for name, dim in (("self_attn.o_proj", 1), ("mlp.down_proj", 1),
                          ("mlp.gate_up_proj", 0)):
            part, full = lay.get_submodule(name), whole.get_submodule(name)
            n = part.weight.shape[dim]
            if dim == 1:  # row-parallel: input columns, every row's scale
                assert torch.equal(part.weight, full.weight[:, rank * n:(rank + 1) * n])
                assert torch.equal(part.weight_scale, full.weight_scale)
            else:  # column-parallel gate | up: this rank's rows of each
                half, inter = n // 2, full.weight.shape[0] // 2
                rows = [*range(rank * half, (rank + 1) * half),
                        *range(inter + rank * half, inter + (rank + 1) * half)]
                assert torch.equal(part.weight, full.weight[rows])
                assert torch.equal(part.weight_scale, full.weight_scale[rows])
    one = LLM(str(tiny4), quantization="int8")
    err1 = max_rel_err(prompt_logits(one, LONG), tiny_ref[2])
    llm = LLM(str(tiny4), quantization="int8", tensor_parallel_size=2)
    try:
        err2 = max_rel_err(prompt_logits(llm, LONG), tiny_ref[2])
        assert 0 < err2 < 1.5 * err1 + 1e-3
    finally:
        close_checked(llm)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_under_tp2(tiny4, tmp_path, bits):
    """A GPTQ-format checkpoint (round-to-nearest codes, groups of 32) under TP=2 gives one
    process's logits: each rank dequantizes exactly its slice of the same codes."""
    from kestrel.quant.gptq import write_rtn_folder

    folder = write_rtn_folder(tiny4, tmp_path / "gptq", bits=bits, group_size=32)
    want = prompt_logits(LLM(str(folder)), LONG)
    llm = LLM(str(folder), tensor_parallel_size=2)
    try:
        assert max_rel_err(prompt_logits(llm, LONG), want) < 1e-4
    finally:
        close_checked(llm)


class _CountingSlice:
    """Stands in for a safetensors slice and records which regions were read."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.reads = t, []

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return "F32"

    def __getitem__(self, index):
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.t[index]


def test_loaders_read_only_their_shard():
    """Column-, row- and vocab-parallel loaders narrow a lazy tensor before reading it."""
    from kestrel.layers.embedding import VocabParallelEmbedding
    from kestrel.layers.linear import QKVParallelLinear, RowParallelLinear
    from kestrel.loader.hf import LazyTensor
    from kestrel.parallel.state import TPGroup

    tp = TPGroup(1, 2, None)  # rank 1 of 2
    qkv = QKVParallelLinear(8, 2, 4, 2, tp=tp)  # 4 heads of 2: this rank's q rows are 4..8
    q = _CountingSlice(torch.randn(8, 8))
    qkv.weight_loader(qkv.weight, LazyTensor(q, "q_proj"), "q")
    assert q.reads == [((4, 8), (0, 8))] and torch.equal(qkv.weight[:4], q.t[4:8])
    row = RowParallelLinear(16, 8, tp=tp)  # input features 8..16
    w = _CountingSlice(torch.randn(8, 16))
    row.weight_loader(row.weight, LazyTensor(w, "o_proj"))
    assert w.reads == [((0, 8), (8, 16))] and torch.equal(row.weight, w.t[:, 8:])
    emb = VocabParallelEmbedding(15, 8, torch.float32, tp)  # padded to 16: rows 8..15 + 1 pad
    e = _CountingSlice(torch.randn(15, 8))
    emb.weight_loader(emb.weight, LazyTensor(e, "embed"))
    assert e.reads == [((8, 15), (0, 8))]
    assert torch.equal(emb.weight[:7], e.t[8:]) and not emb.weight[7].any()


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-checkpoint", "int8", "gptq"])
def test_lazy_shards_equal_eager_shards(tiny4, tmp_path, quant):
    """Each TP rank's parameters are the same whether it read the whole checkpoint or only
    its slices: plain, FP8 quantized on load (scales from whole rows either way), and a
    serialized FP8 checkpoint (fbgemm_fp8: FP8 weights and row scales narrowed together)."""
    import kestrel.attention.torch_ref  # noqa: F401 - registers "torch"
    from kestrel.attention.base import get_backend_cls
    from kestrel.config import QuantConfig
    from kestrel.loader.hf import iterate_weights, load_model_config, read_config
    from kestrel.models.llama import LlamaForCausalLM
    from kestrel.parallel.state import TPGroup
    from kestrel.quant.fp8_checkpoint import (
        checkpoint_weights,
        quant_config_from_hf,
        quantize_folder,
    )

    folder, q = tiny4, None
    if quant == "fp8":
        q = QuantConfig(method="fp8", fp8_skip_layers=False)
    elif quant == "int8":
        q = QuantConfig(method="int8")
    elif quant == "gptq":  # packed 4-bit codes, groups of 32: rows cut whole words and groups
        from kestrel.quant.gptq import quant_config_from_gptq, write_rtn_folder

        folder = write_rtn_folder(tiny4, tmp_path / "gptq", bits=4, group_size=32)
        q = quant_config_from_gptq(read_config(folder)["quantization_config"])
    elif quant == "fp8-checkpoint":
        folder = quantize_folder(tiny4, tmp_path / "fp8", fp8_skip_layers=False)
        q = quant_config_from_hf(read_config(folder))
    cfg = load_model_config(folder)
    for rank in range(2):
        models = [LlamaForCausalLM(cfg, torch.float32, get_backend_cls("torch"), q,
                                   TPGroup(rank, 2, None), (2, 4)) for _ in range(2)]
        models[0].load_weights(checkpoint_weights(iterate_weights(folder), q))
        models[1].load_weights(checkpoint_weights(iterate_weights(folder, lazy=True), q))
        a, b = models[0].state_dict(), models[1].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
