"""FP8 GEMM for a few rows (decode): y [M, N] = (xs·xq)(ws·wq)ᵀ, reading each weight byte once.

    fp8_gemm_small_m ~ kestrel.quant.fp8_ops.fp8_matmul_emulated

At M ≤ 16 a GEMM is a weight stream (2·M flops per weight byte), so its time should be weight
bytes / copy bandwidth. torch._scaled_mm (CUTLASS, tuned for large M) pads M to its tile and
launches few blocks for a skinny problem. Here each program owns a BLOCK_N slice of the output
columns (and with split-K a slice of K), streams its fp8 weight rows along K in 16-byte vectors,
and multiplies by x_scale · w_scale once, at the end.

Two inner products, picked by the config (``default_config``: by M):
  FMA (one x row per program): CUDA-core multiply-add into a [BLOCK_N, BLOCK_K] float32
      accumulator, reduced along K once after the loop, so the loop has no cross-lane traffic.
  dot (M > 1): tensor-core tl.dot of the fp8 tiles, computed transposed, acc [BLOCK_N, BLOCK_M]
      = w · xᵀ, so the weight slice fills the MMA's 64-row side and x pads only to 16 rows.
      fp8 MMAs on Hopper accumulate in reduced precision; promoting to float32 after every
      BLOCK_K (``max_num_imprecise_acc``) limits that to BLOCK_K products per partial sum.
Split-K writes float32 partials [S, M, N]; a second kernel sums them in a fixed order (the
result does not depend on scheduling, unlike atomics). Outputs are rounded half-to-even
explicitly (``round_dtype``), as torch casts, also under the interpreter (which truncates).

    bf16_gemm_small_m(x, w) ~ x.float() @ w.float().T, rounded to x's dtype

The same kernel without scales (``SCALED=False``) for 16-bit or float32 weights, to measure it
against cuBLAS at decode (``bench_fp8_gemm.py --sweep-bf16``); configs count K in elements, so
``default_config(..., elem_bytes=2)`` halves block_k to keep 16-byte vectors. Its tensor-core
dot needs no imprecise-accumulation bound (16-bit MMAs accumulate in float32) and runs float32
inputs in full precision (``input_precision="ieee"``: no TF32 rounding, and no tensor cores).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kestrel.kernels.fp8_quant import DTYPE_CODES, round_dtype
from kestrel.quant.fp8_ops import FP8_DTYPE

_SUM_BLOCK = 1024  # outputs per program of the split-K reduction


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiling and launch of ``fp8_gemm_small_m`` and ``bf16_gemm_small_m``; ``default_config``
    says why its values."""

    block_n: int  # output columns (weight rows) per program
    block_k: int  # K elements per loop step, 16-byte vectors along K (16 fp8, 8 bf16 elements)
    split_k: int = 1  # programs that share one column slice, each over a K range (upper bound)
    use_dot: bool = False  # tensor-core tl.dot; False: CUDA-core FMA, one x row per program
    num_warps: int = 4
    num_stages: int = 3
    # Weight loads marked evict-first: each weight byte is read once per step, so it need not
    # push x, the outputs or the next kernel's data out of L2.
    evict_first: bool = False
    # FMA: load x as a [block_n, block_k] tile, one copy per weight row (L1 hits), so it has the
    # weight tile's layout. Without it, an x row too short for a 16-byte vector per thread
    # (block_k < 512·num_warps fp8, 256·num_warps bf16) gets a layout of its own, and every K
    # step moves the weight tile through shared memory (8 barriers per step at 16 × 512 fp8,
    # 4 warps; Triton 3.9 sm_90 PTX).
    broadcast_x: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two, got {v}")
        if self.use_dot and (self.block_n < 16 or self.block_k < 32):
            raise ValueError("SkinnyConfig: tl.dot on fp8 needs block_n >= 16, block_k >= 32")
        if self.use_dot and self.broadcast_x:
            raise ValueError("SkinnyConfig: broadcast_x is for the FMA path (use_dot=False)")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError("SkinnyConfig: split_k and num_stages must be >= 1")


@functools.cache
def sm_count(device_type: str, index: int | None) -> int:
    """Streaming multiprocessors of a device: how many programs keep it busy."""
    if device_type != "cuda":
        return 1  # the interpreter: one "SM", so defaults never split K
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def gpu_model(device_type: str, index: int | None) -> str | None:
    """The GPU's model ("H100", "H200"): tuned entries for one model, where GPUs with the same
    SM count differ (an H200 streams 1.4x an H100's bytes and wants other tiles). None off
    CUDA."""
    if device_type != "cuda":
        return None
    words = torch.cuda.get_device_name(index).split()
    return words[1] if len(words) > 1 and words[0] == "NVIDIA" else " ".join(words)


# Winners of ``python tests/quant/bench_fp8_gemm.py --sweep`` (it prints these lines), keyed by
# (GPU, rows rounded up to a power of two, N, K), where GPU is an SM count (every GPU with that
# many: a split-K that fills 132 SMs is wrong for 78) or a model (``gpu_model``), which wins.
TUNED: dict[tuple[int, int, int, int], SkinnyConfig] = {
    # H200 (132 SMs), `bench_fp8_gemm.py --sweep --m 1 2`, 2026-11-26: the llama-3-8b and 70b
    # FFN shapes at TP=1; µs of the rule → tuned (share of the 4,222 GB/s copy rate).
    (132, 1, 4096, 14336): SkinnyConfig(4, 1024, 1, num_warps=2),  # 23.1 → 16.7 (83%)
    (132, 1, 28672, 4096): SkinnyConfig(16, 256, 1, evict_first=True,
                                        broadcast_x=True),  # 37.8 → 31.2 (89%)
    (132, 2, 28672, 4096): SkinnyConfig(128, 128, 2, use_dot=True),  # 35.9 → 34.9 (80%)
    (132, 1, 8192, 28672): SkinnyConfig(8, 512, 1, broadcast_x=True),  # 65.3 → 57.7 (96%)
    (132, 1, 57344, 8192): SkinnyConfig(8, 512, 1, broadcast_x=True),  # 124.0 → 111.8 (100%)
    (132, 2, 57344, 8192): SkinnyConfig(128, 256, 1, use_dot=True,
                                        num_warps=8),  # 125.2 → 112.9 (99%)
    # `--sweep --m 4 8 16`, same day: where the rule was > 2% slower
    (132, 4, 28672, 4096): SkinnyConfig(128, 256, 1, use_dot=True, num_warps=8),  # 35.2 → 31.7
    (132, 8, 28672, 4096): SkinnyConfig(128, 128, 2, use_dot=True),  # 34.9 → 33.8
    (132, 16, 28672, 4096): SkinnyConfig(64, 128, 1, use_dot=True),  # 34.2 → 30.5
    (132, 4, 8192, 28672): SkinnyConfig(128, 128, 5, use_dot=True),  # 61.2 → 59.3
    (132, 4, 57344, 8192): SkinnyConfig(128, 256, 1, use_dot=True),  # 119.8 → 111.4
    (132, 8, 57344, 8192): SkinnyConfig(128, 256, 1, use_dot=True, num_warps=8),  # 113.4 → 108.9
    (132, 16, 57344, 8192): SkinnyConfig(128, 256, 1, use_dot=True),  # 111.6 → 108.8
}

# The same for 16-bit weights (``bf16_gemm_small_m``), lines that ``bench_fp8_gemm.py
# --sweep-bf16`` prints; block_k in elements. Only shapes where the tuned kernel beat cuBLAS
# (F.linear) belong here: unquantized linear layers run it exactly for these (``beats_cublas``).
_FMA_2x2048 = SkinnyConfig(2, 2048, 1, num_warps=8, evict_first=True)
TUNED_16BIT: dict[tuple[int, int, int, int], SkinnyConfig] = {
    # H100 (132 SMs, as the H200), `--sweep-bf16`, 2026-11-26: llama-3-8b at TP=1, M=1; µs of
    # F.linear → tuned. One decode step's linears 5,590 → 5,065 µs (1.10x).
    (132, 1, 6144, 4096): _FMA_2x2048,  # qkv 20.5 → 18.3
    (132, 1, 4096, 4096): _FMA_2x2048,  # o_proj 16.7 → 12.9
    (132, 1, 28672, 4096): _FMA_2x2048,  # gate_up 81.3 → 75.3
    (132, 1, 4096, 14336): _FMA_2x2048,  # down 44.4 → 41.5
    (132, 1, 128256, 4096): SkinnyConfig(2, 2048, 1, num_warps=8),  # lm_head 377.0 → 329.8
    # H200, `--sweep-bf16 --preset P --tp 2 --m 1`, 2026-11-26 17:05 UTC: one rank's shapes at
    # TP=2. llama-3-8b: one decode step's linears 2,349 → 2,008 µs (1.17x).
    (132, 1, 3072, 4096): SkinnyConfig(4, 1024, 1, evict_first=True),  # qkv 11.8 → 7.9
    (132, 1, 4096, 2048): SkinnyConfig(4, 512, 1, num_warps=2, evict_first=True),  # o 7.0 → 6.1
    (132, 1, 14336, 4096): SkinnyConfig(16, 256, 1, evict_first=True,
                                        broadcast_x=True),  # gate_up 30.7 → 28.8
    (132, 1, 4096, 7168): SkinnyConfig(4, 512, 1, num_warps=2, evict_first=True),  # 19.8 → 16.2
    (132, 1, 64128, 4096): SkinnyConfig(4, 1024, 1, evict_first=True),  # lm_head 131.8 → 119.1
    # llama-3-70b (o_proj 18.7 → 18.5 is a tie and stays on cuBLAS): 17,408 → 16,440 µs
    (132, 1, 5120, 8192): SkinnyConfig(8, 512, 1, evict_first=True,
                                       broadcast_x=True),  # qkv 26.2 → 21.7
    (132, 1, 28672, 8192): SkinnyConfig(4, 1024, 1, evict_first=True),  # gate_up 110.3 → 105.6
    (132, 1, 8192, 14336): SkinnyConfig(2, 2048, 1, num_warps=8,
                                        evict_first=True),  # down 59.2 → 56.8
    (132, 1, 64128, 8192): SkinnyConfig(4, 1024, 1, evict_first=True),  # lm_head 258.2 → 232.2
    # H200 only, `--sweep-bf16 --m 1`, 2026-11-26 19:27 UTC: llama-3-8b at TP=1, µs of the
    # H100 entries above → H200 winners (o_proj keeps its entry). One decode step's linears
    # 3,943 → 3,755 µs (F.linear 4,147).
    ("H200", 1, 6144, 4096): SkinnyConfig(4, 512, 1, num_warps=2,
                                          evict_first=True),  # qkv 15.1 → 14.0
    ("H200", 1, 28672, 4096): SkinnyConfig(16, 256, 1, evict_first=True,
                                           broadcast_x=True),  # gate_up 58.4 → 55.0
    ("H200", 1, 4096, 14336): SkinnyConfig(16, 256, 3, evict_first=True,
                                           broadcast_x=True),  # down 31.1 → 30.1
    ("H200", 1, 128256, 4096): SkinnyConfig(4, 1024, 1),  # lm_head 247.4 → 235.7
}


def beats_cublas(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Is ``bf16_gemm_small_m(x, w)`` measured faster than F.linear for this shape here (a
    ``TUNED_16BIT`` entry)? x [M, K], w [N, K], 16-bit."""
    if x.dim() != 2 or w.element_size() != 2:
        return False
    dev = x.device
    return _tuned(TUNED_16BIT, gpu_model(dev.type, dev.index), sm_count(dev.type, dev.index),
                  x.shape[0], w.shape[0], w.shape[1]) is not None


def _tuned(table: dict, gpu: str | None, num_sms: int, m: int, n: int, k: int
           ) -> SkinnyConfig | None:
    """The table's entry for this GPU model, else for its SM count, else None."""
    rows = triton.next_power_of_2(m)
    return table.get((gpu, rows, n, k)) or table.get((num_sms, rows, n, k))


def default_config(m: int, n: int, k: int, num_sms: int, elem_bytes: int = 1,
                   gpu: str | None = None) -> SkinnyConfig:
    """The tuned config of this shape on this GPU (``gpu``: its model, or None) if its table
    has one (``elem_bytes``, bytes per weight element: 1 fp8 → ``TUNED``, 2 bf16/fp16 →
    ``TUNED_16BIT``, 4: none), else a rule that is a starting point for Hopper.

    M == 1: FMA, 16 columns × 512 bytes of K per step (4 × 16-byte loads and 64 accumulators per
    thread at 4 warps); M > 1: tensor cores, 64 columns (one wgmma side) × 256 K. K is split
    until there are about 4 (FMA) or 2 (dot) programs per SM to keep enough bytes in flight,
    with at least 2 K steps per split. Wider weights take block_k / elem_bytes elements.
    """
    tuned = _tuned(_tuned_table(elem_bytes), gpu, num_sms, m, n, k)
    if tuned is not None:
        return tuned
    if m == 1:
        block_n, block_k, per_sm, dot = 16, 512, 4, False
    else:
        block_n, block_k, per_sm, dot = 64, 256, 2, True
    block_k //= elem_bytes  # the same bytes per K step as fp8
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))  # tiny K: no huge masked tile
    split = split_to_fill(n, k, block_n, block_k, per_sm * num_sms)
    return SkinnyConfig(block_n, block_k, split, dot)


def _tuned_table(elem_bytes: int) -> dict[tuple[int, int, int, int], SkinnyConfig]:
    # looked up at call time, so tests can patch the module's tables
    return {1: TUNED, 2: TUNED_16BIT}.get(elem_bytes, {})


def split_to_fill(n: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """The split-K that brings the grid to about ``programs`` programs, keeping ≥ 2 K steps in
    each split (1 when the column slices alone are enough)."""
    k_steps = triton.cdiv(k, block_k)
    return max(1, min(triton.cdiv(programs, triton.cdiv(n, block_n)), k_steps // 2))


@triton.jit
def _load_tiles(x_ptrs, w_ptrs, offs_k, K, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr):
    """One K step of x and w; masked past K unless every step is full."""
    if EVEN_K:
        w = tl.load(w_ptrs, eviction_policy=W_EVICT)
        x = tl.load(x_ptrs)
    else:
        in_k = offs_k[None, :] < K
        w = tl.load(w_ptrs, mask=in_k, other=0.0, eviction_policy=W_EVICT)
        x = tl.load(x_ptrs, mask=in_k, other=0.0)
    return x, w


@triton.jit
def _fma_loop(x_ptrs, w_ptrs, offs_k, k_lo, k_hi, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr,
              BROADCAST_X: tl.constexpr):
    """x_ptrs [1, BLOCK_K], w_ptrs [BLOCK_N, BLOCK_K] → x·wᵀ as [BLOCK_N, 1] float32."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if BROADCAST_X:  # x in the weight tile's layout (SkinnyConfig.broadcast_x)
        x_ptrs = x_ptrs + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    for _ in range(k_lo, k_hi, BLOCK_K):
        x, w = _load_tiles(x_ptrs, w_ptrs, offs_k, K, EVEN_K, W_EVICT)
        acc += w.to(tl.float32) * x.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
    return tl.sum(acc, axis=1)[:, None]


@triton.jit
def _dot_loop(x_ptrs, w_ptrs, offs_k, k_lo, k_hi, K, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              W_EVICT: tl.constexpr, SCALED: tl.constexpr, DOT_F32: tl.constexpr):
    """x_ptrs [BLOCK_M, BLOCK_K], w_ptrs [BLOCK_N, BLOCK_K] → w·xᵀ as [BLOCK_N, BLOCK_M]."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(k_lo, k_hi, BLOCK_K):
        x, w = _load_tiles(x_ptrs, w_ptrs, offs_k, K, EVEN_K, W_EVICT)
        if SCALED:  # fp8: promoted to float32 every BLOCK_K products
            acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
        elif DOT_F32:  # float32 operands, no TF32 rounding (FMA, not tensor cores)
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc,
                         input_precision="ieee")
        else:  # 16-bit MMA, float32 accumulation
            acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
    return acc


@triton.jit
def _skinny_kernel(
    x_ptr,  # [M, K] fp8 (SCALED) or w's dtype, K contiguous
    xs_ptr,  # [M] float32; not read unless SCALED
    w_ptr,  # [N, K] fp8 (SCALED) or bf16 / fp16 / float32, K contiguous
    ws_ptr,  # [N] float32; not read unless SCALED
    out_ptr,  # [M, N] output dtype; [S, M, N] float32 partials when SPLIT
    M, N, K,
    stride_xm,
    stride_wn,
    k_per_split,  # a multiple of BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    DT: tl.constexpr,
    W_EVICT: tl.constexpr,  # eviction policy of weight loads: "" or "evict_first"
    BROADCAST_X: tl.constexpr,
    SCALED: tl.constexpr,  # fp8 operands with row scales; False: plain x·wᵀ
    DOT_F32: tl.constexpr,  # unscaled dot in float32, IEEE (float32 operands; see _launch)
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamped rows: loads need no mask along N or M; the duplicates are computed, never stored.
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    if USE_DOT:
        acc = _dot_loop(x_ptrs, w_ptrs, offs_k, k_lo, k_hi, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                        W_EVICT, SCALED, DOT_F32)
    else:
        acc = _fma_loop(x_ptrs, w_ptrs, offs_k, k_lo, k_hi, K, BLOCK_N, BLOCK_K, EVEN_K,
                        W_EVICT, BROADCAST_X)
    if SCALED:
        ws = tl.load(ws_ptr + rows_n)
        xs = tl.load(xs_ptr + rows_m)
        y = acc * ws[:, None] * xs[None, :]  # [BLOCK_N, BLOCK_M]
    else:
        y = acc
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    offs = offs_m[None, :] * N + offs_n[:, None]  # out is [M, N] row-major: N is contiguous
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + offs, y, mask=mask)
    else:
        tl.store(out_ptr + offs, round_dtype(y, DT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, DT: tl.constexpr,
                       BLOCK: tl.constexpr):
    """p [SPLIT_K, numel] float32 → out [numel]: the partials summed in split order, rounded."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_dtype(acc, DT).to(out_ptr.dtype.element_ty), mask=mask)


def _operands(xq, x_scale, wq, w_scale, out_dtype):
    """Validate; return K-contiguous fp8 operands and flat float32 scales."""
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm_small_m: operands must be {FP8_DTYPE}, got {xq.dtype} and "
                         f"{wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"fp8_gemm_small_m: shapes {tuple(xq.shape)} × {tuple(wq.shape)}ᵀ "
                         "do not multiply ([M, K] and [N, K] expected)")
    if x_scale.numel() != xq.shape[0] or w_scale.numel() != wq.shape[0]:
        raise ValueError(f"fp8_gemm_small_m: scales {tuple(x_scale.shape)} and "
                         f"{tuple(w_scale.shape)}, expected one per row of x and of w")
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"fp8_gemm_small_m: out_dtype {out_dtype} not one of "
                         f"{list(DTYPE_CODES)}")
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).to(torch.float32).contiguous()
    return xq, xs, wq, ws


def _out_tensor(name: str, out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous [{m}, {n}] {dtype} "
                         f"tensor, got {tuple(out.shape)} {out.dtype}")
    return out


def _launch(x: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
            out: torch.Tensor, cfg: SkinnyConfig, scaled: bool) -> torch.Tensor:
    """The skinny kernel (and the split-K sum) on validated, K-contiguous operands, M, N, K > 0."""
    (m, k), n = x.shape, w.shape[0]
    dt = DTYPE_CODES[out.dtype]
    block_m = min(64, max(16, triton.next_power_of_2(m))) if cfg.use_dot else 1
    k_steps = triton.cdiv(k, cfg.block_k)
    steps_per_split = triton.cdiv(k_steps, min(cfg.split_k, k_steps))
    split = triton.cdiv(k_steps, steps_per_split)  # no empty split
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
    # float32 dots in IEEE precision; also bf16 ones under the interpreter, whose tl.dot
    # (Triton 3.9) multiplies bf16 tiles as their raw 16-bit integers. bf16 products are exact
    # in float32, so this is the same function as the GPU's bf16 MMA.
    dot_f32 = not scaled and (w.dtype == torch.float32
                              or (w.dtype == torch.bfloat16 and not _compiled()))
    _skinny_kernel[grid](
        x, xs, w, ws, dst, m, n, k, x.stride(0), w.stride(0), steps_per_split * cfg.block_k,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
        EVEN_K=k % cfg.block_k == 0, SPLIT=split > 1, DT=dt,
        W_EVICT="evict_first" if cfg.evict_first else "", BROADCAST_X=cfg.broadcast_x,
        SCALED=scaled, DOT_F32=dot_f32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
            dst, out, m * n, SPLIT_K=split, DT=dt, BLOCK=_SUM_BLOCK, num_warps=4)
    return out


def _compiled() -> bool:
    """Compiled for a GPU, not run by the interpreter (TRITON_INTERPRET=1)?"""
    return isinstance(_skinny_kernel, triton.runtime.JITFunction)


def fp8_gemm_small_m(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq [M, K] fp8, x_scale [M, 1], wq [N, K] fp8, w_scale [N, 1] (or [1, N]) → [M, N].

    Computes ``fp8_matmul_emulated``'s function with float32 accumulation; ``config``
    overrides ``default_config`` (tests, tuning); ``out``: a contiguous [M, N] tensor of
    ``out_dtype`` to write. CUDA-graph safe: no host synchronisation.
    """
    xq, xs, wq, ws = _operands(xq, x_scale, wq, w_scale, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    out = _out_tensor("fp8_gemm_small_m", out, m, n, out_dtype, xq.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    dev = xq.device
    cfg = config or default_config(m, n, k, sm_count(dev.type, dev.index),
                                   gpu=gpu_model(dev.type, dev.index))
    return _launch(xq, xs, wq, ws, out, cfg, scaled=True)


def bf16_gemm_small_m(x: torch.Tensor, w: torch.Tensor, config: SkinnyConfig | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], w [N, K] of one dtype (bf16, fp16 or float32) → x·wᵀ [M, N] in that dtype.

    ``fp8_gemm_small_m``'s kernel without scales: float32 accumulation, the output rounded
    once (half to even). ``config`` overrides ``default_config(..., elem_bytes)``, whose
    ``TUNED_16BIT`` is this function's table; ``out``: a contiguous [M, N] tensor of x's dtype.
    CUDA-graph safe: no host synchronisation.
    """
    if x.dtype not in DTYPE_CODES or w.dtype != x.dtype:
        raise ValueError(f"bf16_gemm_small_m: x and w must have one dtype of "
                         f"{list(DTYPE_CODES)}, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"bf16_gemm_small_m: shapes {tuple(x.shape)} × {tuple(w.shape)}ᵀ "
                         "do not multiply ([M, K] and [N, K] expected)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    out = _out_tensor("bf16_gemm_small_m", out, m, n, x.dtype, x.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    dev = x.device
    cfg = config or default_config(m, n, k, sm_count(dev.type, dev.index),
                                   elem_bytes=w.element_size(), gpu=gpu_model(dev.type, dev.index))
    return _launch(x, x, w, w, out, cfg, scaled=False)  # x, w in place of the unread scales
