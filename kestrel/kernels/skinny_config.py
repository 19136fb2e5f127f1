"""Tiles and launch settings of the skinny GEMM (``fp8_gemm``), tuned per GPU and shape.

``default_config`` answers "which config for this (rows, N, K) on this GPU": a tuned entry from
``TUNED`` (fp8 weights; int8 ``TUNED_INT8`` first) or ``TUNED_16BIT`` (bf16/fp16), keyed by
GPU model or SM count, else a rule. ``beats_cublas`` says where the 16-bit kernel replaces F.linear in the unquantized layers.
The tables are looked up at call time, so tests patch them here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


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
    # FMA: load each K step's tiles during the step before. On an H200 it took the bf16 qkv
    # GEMV (6144 x 4096) from 15.8 to 13.7 µs, but gate_up and down (FP8 and bf16) 10-60%
    # slower (more registers, fewer programs per SM): a tuned choice per shape.
    prefetch: bool = False
    # FMA: K steps loaded per loop iteration (1, 2 or 4), every tile of a group before its
    # products, at constant offsets: more bytes in flight a thread, same sums in the same order.
    # (prefetch's look-ahead pointer, chosen at run time, costs the fp8 loop its 16-byte
    # vectors: ~76 PRMT a step in its SASS.)
    ahead: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two, got {v}")
        if self.use_dot and (self.block_n < 16 or self.block_k < 32):
            raise ValueError("SkinnyConfig: tl.dot on fp8 needs block_n >= 16, block_k >= 32")
        if self.use_dot and (self.broadcast_x or self.prefetch):
            raise ValueError("SkinnyConfig: broadcast_x and prefetch are for the FMA path "
                             "(use_dot=False)")
        if self.ahead not in (1, 2, 4) or self.ahead > 1 and (self.use_dot or self.prefetch):
            raise ValueError("SkinnyConfig: ahead is 1, 2 or 4, for the FMA path without "
                             "prefetch")
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
    # H200, `scripts/sweep_skinny_shapes.py --fp8`, eleventh session: down 16.06 → 15.65 µs
    # alone; FP8-recipe decode 3.0221 → 2.9818 ms (`scripts/ab_skinny_configs.py`)
    ("H200", 1, 4096, 14336): SkinnyConfig(4, 1024, 1, num_stages=1, evict_first=True,
                                           broadcast_x=True),
    # twentieth session: gate_up's K steps loaded two at a time, 30.39 → 29.25 µs alone
    # (`time_skinny.py --ahead 2`); FP8-recipe decode 2.8988 → 2.8890 ms, two rounds each
    # (`ab_skinny_configs.py`, call 2)
    ("H200", 1, 28672, 4096): SkinnyConfig(16, 256, 1, evict_first=True, broadcast_x=True,
                                           ahead=2),
    # twenty-first session, H200: the attention projections in FP8 (`--fp8-attention`), whose
    # rule configs split K (a sum kernel each) and ran at 42-48% of the copy rate;
    # `sweep_skinny_shapes.py --fp8 --budget-s 60` (call 10): qkv 12.31 → 7.25 µs, o_proj
    # 9.45 → 5.03 µs alone; FP8-everywhere batch-1 decode 2.950, 2.952 → 2.643, 2.644 ms
    # (calls 11-12, alternating order; BF16 3.840 on the same machine)
    ("H200", 1, 6144, 4096): SkinnyConfig(16, 512, 1, num_warps=8, evict_first=True,
                                          broadcast_x=True, ahead=4),
    ("H200", 1, 4096, 4096): SkinnyConfig(4, 1024, 1, num_warps=2, evict_first=True, ahead=4),
    # H100, twentieth session: down's K steps two at a time (and evict_first); FP8-recipe decode
    # 3.7726 → 3.7366 ms, two rounds each (`ab_skinny_configs.py`, call 6); gate_up's H200
    # entry made the H100 slower (3.7840)
    ("H100", 1, 4096, 14336): SkinnyConfig(4, 1024, 1, num_warps=2, evict_first=True, ahead=2),
}

# W8A8's int8 weights, where one row runs dp4a (fp8_gemm's docstring) and wants other tiles
# than fp8's FMA loop; looked up before ``TUNED``, which serves the rest (its dot configs fit
# int8's tensor-core dot as well). H200, a sweep of 17 tiles with the default split
# (twenty-ninth session, call 3), then `scripts/time_skinny.py` (calls 4 -> 6, two machines):
# qkv 9.29 -> 7.47 µs, down 19.82 -> 15.23 (91% of the copy rate). End to end not shown: W8A8
# batch-1 decode 1.50x -> 1.49x BF16 across those calls, within their spread.
TUNED_INT8: dict[tuple[int | str, int, int, int], SkinnyConfig] = {
    ("H200", 1, 6144, 4096): SkinnyConfig(4, 2048, 1),
    ("H200", 1, 4096, 14336): SkinnyConfig(4, 2048, 1),
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
    ("H200", 1, 6144, 4096): SkinnyConfig(4, 512, 1, num_warps=2, evict_first=True,
                                          prefetch=True),  # qkv 15.1 → 14.0; prefetch 13.7
    # TP=2's qkv with prefetch (tenth session, `scripts/time_skinny.py`): 7.9 → 7.0
    ("H200", 1, 3072, 4096): SkinnyConfig(4, 1024, 1, evict_first=True, prefetch=True),
    ("H200", 1, 28672, 4096): SkinnyConfig(16, 256, 1, evict_first=True,
                                           broadcast_x=True),  # gate_up 58.4 → 55.0
    ("H200", 1, 128256, 4096): SkinnyConfig(4, 1024, 1),  # lm_head 247.4 → 235.7
    # Eleventh session, H200. TP=1's o_proj and down, chosen in the engine by
    # `scripts/ab_skinny_configs.py` (batch-1 decode TPOT, same call, base → this): o_proj
    # 3.9818 → 3.9699 ms, down 3.9818 → 3.9756 (was n16 k256 split 3 bx). Timed alone a GEMV
    # follows another GEMV, in a step a small kernel: the TP=1 qkv winner of
    # `scripts/sweep_skinny_shapes.py` (n8 k256 w8 bx, 13.78 → 12.88 µs alone) made the step
    # slower (3.9818 → 3.9906 ms), so it is not here.
    ("H200", 1, 4096, 4096): SkinnyConfig(4, 1024, 1, num_stages=1, evict_first=True),
    ("H200", 1, 4096, 14336): SkinnyConfig(4, 2048, 1, num_warps=8, num_stages=1,
                                           evict_first=True),
    # One rank's down, o_proj and LM head at TP=2, `scripts/sweep_skinny_shapes.py`: µs alone
    # of the 132-SM entries → these (copy 4,244 GB/s); TP=2 decode 2.605 → 2.503 ms.
    ("H200", 1, 4096, 7168): SkinnyConfig(4, 2048, 1, num_warps=8, num_stages=1,
                                          evict_first=True),  # down 18.10 → 14.96 (92.5%)
    ("H200", 1, 4096, 2048): SkinnyConfig(4, 1024, 1, num_stages=1,
                                          evict_first=True),  # o_proj 5.69 → 4.77 (82.8%)
    ("H200", 1, 64128, 4096): SkinnyConfig(2, 1024, 1, num_stages=1,
                                           evict_first=True),  # 123.3 → 119.6
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
                   gpu: str | None = None, int8: bool = False) -> SkinnyConfig:
    """The tuned config of this shape on this GPU (``gpu``: its model, or None) if its table
    has one (``elem_bytes``, bytes per weight element: 1 fp8 → ``TUNED``, 2 bf16/fp16 →
    ``TUNED_16BIT``, 4: none; ``int8``: ``TUNED_INT8`` first), else a rule that is a starting
    point for Hopper.

    M == 1: FMA, 16 columns × 512 bytes of K per step (4 × 16-byte loads and 64 accumulators per
    thread at 4 warps); M > 1: tensor cores, 64 columns (one wgmma side) × 256 K. K is split
    until there are about 4 (FMA) or 2 (dot) programs per SM to keep enough bytes in flight,
    with at least 2 K steps per split. Wider weights take block_k / elem_bytes elements.
    """
    tuned = (int8 and _tuned(TUNED_INT8, gpu, num_sms, m, n, k)) \
        or _tuned(_tuned_table(elem_bytes), gpu, num_sms, m, n, k)
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
