"""Linear layers that own their tensor-parallel sharding, weight loading and quantization method.

Quantization plugs in here and nowhere else: a layer holds a ``QuantMethod`` that creates its
parameters, post-processes them after loading, and applies the layer to activations.

Every parameter a method creates carries ``output_dim`` (the axis split across column-parallel
ranks, or None) and ``input_dim`` (the axis split across row-parallel ranks, or None); the
layer's ``weight_loader`` uses them to cut this rank's shard out of a full checkpoint tensor.
The loaders only ``narrow`` what they are given before copying, so a lazy checkpoint tensor
(``loader.hf.LazyTensor``) is read from disk for this rank's shard alone.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.kernels.cute import hopper_kernel
from kestrel.loader.hf import materialize
from kestrel.parallel.state import SINGLE, TPGroup, divide


class QuantMethod(ABC):
    """How one linear layer stores its weight and computes ``y = x Wᵀ + b``."""

    @abstractmethod
    def create_weights(
        self, layer: LinearBase, input_size: int, output_size: int, dtype: torch.dtype
    ) -> None:
        """Register this rank's parameters on ``layer`` (sizes are per partition)."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Turn loaded checkpoint tensors into the layout ``apply`` wants (e.g. quantize)."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] → [T, out] for this rank's partition."""


def set_param_dims(param: nn.Parameter, output_dim: int | None, input_dim: int | None) -> None:
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]


def dense_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except on GPU shapes where the Triton skinny GEMM measured faster than cuBLAS
    (batch-1 decode of the tuned models: ``skinny_config.TUNED_16BIT``)."""
    if x.is_cuda and bias is None:
        from kestrel.kernels.fp8_gemm import bf16_gemm_small_m
        from kestrel.kernels.skinny_config import beats_cublas

        if beats_cublas(x, weight):
            return bf16_gemm_small_m(x, weight)
    return F.linear(x, weight, bias)


class UnquantizedLinearMethod(QuantMethod):
    """Plain dense weights in the model dtype."""

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        set_param_dims(weight, 0, 1)
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        return dense_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Shared parts: the quant method, the optional bias, and shard bookkeeping."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        quant_method: QuantMethod | None,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size  # this rank's input features
        self.output_size = output_size  # this rank's output features
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_size, dtype)
        if bias:
            b = nn.Parameter(torch.zeros(output_size, dtype=dtype), requires_grad=False)
            set_param_dims(b, 0, None)
            self.register_parameter("bias", b)
        else:
            self.bias = None
        for p in self.parameters(recurse=False):
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def _copy(self, param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
        if param.shape != loaded.shape:
            raise ValueError(
                f"{name}: checkpoint shard has shape {tuple(loaded.shape)}, "
                f"expected {tuple(param.shape)}"
            )
        param.data.copy_(materialize(loaded))  # a lazy slice is read from disk only here

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Default: replicated parameter, copied whole."""
        self._copy(param, loaded, getattr(param, "name", "parameter"))


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size, output_size, bias=False, dtype=torch.float32,
                 quant_method=None, tp: TPGroup = SINGLE) -> None:
        super().__init__(input_size, output_size, bias, dtype, quant_method, SINGLE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank computes its slice (Megatron's A in XA)."""

    def __init__(self, input_size, output_size, bias=False, dtype=torch.float32,
                 quant_method=None, tp: TPGroup = SINGLE, gather_output: bool = False) -> None:
        self.gather_output = gather_output
        super().__init__(input_size, divide(output_size, tp.size, "output features"), bias, dtype,
                         quant_method, tp)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        dim = getattr(param, "output_dim", None)
        if dim is not None and loaded.dim() > dim:
            size = param.shape[dim]
            loaded = loaded.narrow(dim, self.tp.rank * size, size)
        self._copy(param, loaded, "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return self.tp.all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate+up)."""

    def __init__(self, input_size, output_sizes: list[int], bias=False, dtype=torch.float32,
                 quant_method=None, tp: TPGroup = SINGLE) -> None:
        self.output_sizes = [divide(s, tp.size, "output features") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, dtype, quant_method, tp)

    def shard_range(self, shard_id: int) -> tuple[int, int, int]:
        """(offset in this rank's param, size, start in the full checkpoint tensor)."""
        size = self.output_sizes[shard_id]
        return sum(self.output_sizes[:shard_id]), size, self.tp.rank * size

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None or dim is None or loaded.dim() <= dim:
            return super().weight_loader(param, loaded)
        offset, size, start = self.shard_range(shard_id)
        self._copy(param.data.narrow(dim, offset, size), loaded.narrow(dim, start, size),
                   f"shard {shard_id}")


class QKVParallelLinear(MergedColumnParallelLinear):
    """Q, K and V projections; KV heads are split across ranks, replicated when ranks outnumber them."""

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, bias=False,
                 dtype=torch.float32, quant_method=None, tp: TPGroup = SINGLE) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        if tp.size >= num_kv_heads:
            divide(tp.size, num_kv_heads, "tensor-parallel size vs KV heads")
            self.num_kv_heads, self.kv_replicas = 1, tp.size // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp.size, "KV heads"), 1
        q, kv = self.num_heads * head_dim * tp.size, self.num_kv_heads * head_dim * tp.size
        super().__init__(hidden_size, [q, kv, kv], bias, dtype, quant_method, tp)

    def shard_range(self, shard_id) -> tuple[int, int, int]:
        idx = {"q": 0, "k": 1, "v": 2}[shard_id] if isinstance(shard_id, str) else shard_id
        offset, size, _ = super().shard_range(idx)
        rank = self.tp.rank if idx == 0 else self.tp.rank // self.kv_replicas
        return offset, size, rank * size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products summed by one all-reduce."""

    def __init__(self, input_size, output_size, bias=False, dtype=torch.float32,
                 quant_method=None, tp: TPGroup = SINGLE, reduce_results: bool = True) -> None:
        self.reduce_results = reduce_results
        super().__init__(divide(input_size, tp.size, "input features"), output_size, bias, dtype,
                         quant_method, tp)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        dim = getattr(param, "input_dim", None)
        if dim is not None and loaded.dim() > dim:
            size = param.shape[dim]
            loaded = loaded.narrow(dim, self.tp.rank * size, size)
        self._copy(param, loaded, "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the reduction, not once per rank.
        y = self.quant_method.apply(self, x, None)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y


def swiglu_skinny(gate_up: MergedColumnParallelLinear, down: RowParallelLinear,
                  x: torch.Tensor) -> torch.Tensor | None:
    """down(silu(gate) · up) with the activation folded into the two skinny GEMVs (gate_up's
    output columns of the gate go through silu as they are stored, down multiplies by up as it
    loads: ``bf16_gemm_small_m``'s ``silu_cols`` and ``glu``), so no kernel runs between them;
    the same bits as the three steps. None where either layer would not run the skinny kernel
    (quantized or biased layers, shapes not in ``TUNED_16BIT``, CPU)."""
    if not (x.is_cuda and gate_up.bias is None and down.bias is None
            and type(gate_up.quant_method) is UnquantizedLinearMethod
            and type(down.quant_method) is UnquantizedLinearMethod):
        return None
    from kestrel.kernels.fp8_gemm import bf16_gemm_small_m
    from kestrel.kernels.skinny_config import beats_cublas

    if not (beats_cublas(x, gate_up.weight) and beats_cublas(x, down.weight)):
        return None
    h = bf16_gemm_small_m(x, gate_up.weight, silu_cols=gate_up.output_sizes[0])
    y = bf16_gemm_small_m(h, down.weight, glu=True)
    return down.tp.all_reduce(y) if down.reduce_results else y


# Steps with at least this many rows take gate_up and SiLU·mul as one GEMM (``gate_up_swiglu``).
# H200, Llama-3-8B's gate_up (4,096 → 2 × 14,336), bf16, ``bench_cute_kernels.py --only
# quack-gated`` (twenty-fifth session), µs against F.linear + silu_and_mul: 1k rows 363.5 /
# 397.0, 2k 709.8 / 767.2, 4k 1,349.9 / 1,389.6, 16k 5,565.8 / 6,061.5.
GATED_MIN_TOKENS = 1024


@functools.cache
def _quack_gated(device: torch.device):
    """quack's ``gemm_gated_out`` (Tri Dao's CuTe DSL GEMMs, the ``quack-kernels`` package that
    FlashAttention 4 installs) where it was measured and passes ``gated_self_check``: Hopper,
    ``KESTREL_QUACK`` not 0. Its one kernel (the default config, symbolic in the row count)
    compiles in the check (~3 s; quack keeps it on disk). None elsewhere."""
    gemm_gated_out = hopper_kernel(device, "KESTREL_QUACK", "quack.gemm_interface",
                                   "gemm_gated_out")
    if gemm_gated_out is None:
        return None
    failure = gated_self_check(gemm_gated_out, device)
    if failure is not None:
        logging.getLogger(__name__).warning(
            "quack's gated GEMM is installed but failed its check (%s): the MLP keeps F.linear "
            "+ SiLU·mul (KESTREL_QUACK=0 leaves quack out without the check)", failure)
        return None
    return gemm_gated_out


def gated_self_check(gated, device: torch.device) -> str | None:
    """Run ``gated`` once as ``gate_up_swiglu`` will, on a small problem, against the float64
    product: an installed kernel library that fails to compile here (quack refuses, for one,
    to fingerprint code outside a ``site-packages`` folder) or computes wrongly is left out
    with a warning instead of failing or corrupting every long prefill. The reason, or None."""
    # sizes in whole tiles, as the models' are (an edge case of the kernel is not the question)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 512, generator=gen, device=device).to(torch.bfloat16)
    w = (torch.randn(2 * 512, 512, generator=gen, device=device) / 16 / 2 ** 0.5).to(torch.bfloat16)
    out = torch.full((256, 512), float("nan"), dtype=torch.bfloat16, device=device)
    try:
        gated(x, w.t(), None, out, activation="swiglu", concat_layout="B", tuned=False)
    except Exception as e:  # noqa: BLE001 (any failure of a third-party kernel means: not this one)
        return f"{type(e).__name__}: {str(e)[:200]}"
    gate, up = F.linear(x.double(), w.double()).chunk(2, dim=-1)
    want = F.silu(gate) * up
    if not torch.allclose(out.double(), want, rtol=2 ** -7, atol=1e-3):
        err = float((out.double() - want).abs().nan_to_num(float("inf")).max())
        return f"max |error| {err:.3g} against the float64 product"
    return None


def gate_up_swiglu(gate_up: MergedColumnParallelLinear, x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) · up straight out of gate_up's GEMM: quack applies it in the epilogue to the
    fp32 accumulator and stores only the product, so the [T, 2 × intermediate] output is
    neither written nor read again (one rounding instead of two). The weight stays as stored,
    [gate; up] (``concat_layout``). None for steps under ``GATED_MIN_TOKENS`` rows, quantized or
    biased layers, other dtypes than bfloat16, inside CUDA graph capture, and where quack is
    not installed or not measured."""
    if (x.shape[0] < GATED_MIN_TOKENS or x.dtype != torch.bfloat16 or gate_up.bias is not None
            or type(gate_up.quant_method) is not UnquantizedLinearMethod):
        return None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    gated = _quack_gated(x.device)
    if gated is None:
        return None
    out = x.new_empty(x.shape[0], gate_up.weight.shape[0] // 2)
    gated(x, gate_up.weight.t(), None, out, activation="swiglu", concat_layout="B", tuned=False)
    return out
