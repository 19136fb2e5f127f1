"""Experiment (tenth session, for the next GPU call): the FP8 and bf16 GEMVs at M = 1 on tensor
cores with the weights loaded straight into MMA fragments, against the CUDA-core kernel
(``fp8_gemm._skinny_kernel``), which reads gate_up at ~90% and down at ~86% of the copy rate
while the bf16 one reads the same bytes at 95–103% (docs/PERFORMANCE.md, tenth session: not
the weights' conversion instruction, not occupancy, not per-warp load latency). Its loop spends
per 32 weights 24 conversions, 48 half→float moves and 32 FMAs. Here one ``mma.sync m16n8k32``
on e4m3 takes 512 weights a warp. Hopper has FP8 only in wgmma, so ptxas lowers it to e4m3 →
f16 conversions and two f16 MMAs (``--compile``: 12 F2FP + 2 HMMA.16816.F32 per 16 weights a
lane): the conversions stay, the half→float moves and FMAs go, about half the instructions.
bf16 weights take ``m16n8k16`` natively (one HMMA per 8 weights a lane, no conversion): the
bf16 GEMVs of TP=2 (o_proj, down at 69-77% of the copy rate) are the other candidates.

The trick: a dot product does not care in which order it visits K, so each thread's own
16-byte load of a weight row can be its A fragment. With the load layout of a [BLOCK_N, 64] fp8
tile (16 bytes a thread, lanes 4 along K, 8 along rows), lane (g, t) = (lane / 4, lane % 4) holds
row g's bytes [16t, 16t + 16) of the step and x's same bytes (x broadcast over rows). Fragment
A's rows g and g + 8 take that row's bytes 0–7 and 8–15, so every position p of the MMA maps to
the same K in all rows g (and another, also common, K in all rows g + 8); B's column j, given by
lanes with g = j, holds x's bytes 0–7 for even j and 8–15 for odd j. Then C[g][0] + C[g + 8][1]
(lane (g, 0)'s c0 + c3) is row g's dot product over the step's 64 bytes. Triton does not expose
fragments, so the MMA is inline PTX over 16 packed elements per lane (``pack=16``); the layout
it relies on is checked by the result.

    python scripts/bench_fp8_mma.py             # one GPU: bits vs the emulation, µs vs the kernel
    python scripts/bench_fp8_mma.py --compile   # no GPU: compile for sm_90, show the SASS's MMAs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _mma_asm(pack: int, mma: str) -> tuple[tl.constexpr, tl.constexpr]:
    """One MMA per ``pack`` elements a lane: outputs $0.. (c0-c3, then zeros), w's 4 registers,
    x's 4 registers (even row groups take x's first 8 bytes, odd ones its last 8), acc's ``pack``
    (c0-c3 used)."""
    w, x, acc = pack, pack + 4, pack + 8
    zeros = "".join(f"mov.b32 ${i}, 0;" for i in range(4, pack))
    asm = ("{ .reg .pred p; .reg .b32 lane, xb0, xb1;"
           "mov.u32 lane, %laneid; shr.u32 lane, lane, 2; and.b32 lane, lane, 1;"
           "setp.eq.u32 p, lane, 0;"
           f"selp.b32 xb0, ${x}, ${x + 2}, p; selp.b32 xb1, ${x + 1}, ${x + 3}, p;"
           f"{mma} {{$0, $1, $2, $3}}, {{${w}, ${w + 2}, ${w + 1}, ${w + 3}}}, {{xb0, xb1}},"
           f" {{${acc}, ${acc + 1}, ${acc + 2}, ${acc + 3}}};" + zeros + "}")
    return tl.constexpr(asm), tl.constexpr("=r," * pack + "r," * 8 + ",".join(["r"] * pack))


def _final_asm(pack: int) -> tuple[tl.constexpr, tl.constexpr]:
    """Lane (g, 0): c0 + c3 (its row's sum) in element 0, every other element 0."""
    asm = ("{ .reg .pred p; .reg .b32 lane; .reg .f32 s;"
           "mov.u32 lane, %laneid; and.b32 lane, lane, 3; setp.eq.u32 p, lane, 0;"
           f"add.f32 s, ${pack}, ${pack + 3}; selp.f32 $0, s, 0f00000000, p;"
           + "".join(f"mov.b32 ${i}, 0;" for i in range(1, pack)) + "}")
    return tl.constexpr(asm), tl.constexpr("=r," * pack + ",".join(["r"] * pack))


_FP8_MMA, _FP8_MMA_IO = _mma_asm(16, "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32")
_BF16_MMA, _BF16_MMA_IO = _mma_asm(8, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
_FP8_FINAL, _FP8_FINAL_IO = _final_asm(16)
_BF16_FINAL, _BF16_FINAL_IO = _final_asm(8)


@triton.jit
def _mma_gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, N, K, stride_wn, k_per_split,
                     BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FP8: tl.constexpr):
    """out[n] (or split partials [S, N]) = xs · ws[n] · Σ_k x[k] w[n, k] (FP8), or Σ_k x[k]
    w[n, k] (bf16); 16 bytes of K a lane and step: 64 fp8 or 32 bf16 a row and step."""
    KT: tl.constexpr = 64 if FP8 else 32
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_lo = pid_k * k_per_split
    offs_k = k_lo + tl.arange(0, KT)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k[None, :] + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N, KT], dtype=tl.float32)
    for k in range(k_lo, tl.minimum(k_lo + k_per_split, K), KT):
        m = (offs_k < K)[None, :]
        w = tl.load(w_ptrs, mask=m, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=m, other=0.0)
        if FP8:
            acc = tl.inline_asm_elementwise(
                _FP8_MMA, _FP8_MMA_IO,
                [w.to(tl.uint8, bitcast=True), x.to(tl.uint8, bitcast=True), acc],
                dtype=tl.float32, is_pure=True, pack=16)
        else:
            acc = tl.inline_asm_elementwise(
                _BF16_MMA, _BF16_MMA_IO,
                [w.to(tl.uint16, bitcast=True), x.to(tl.uint16, bitcast=True), acc],
                dtype=tl.float32, is_pure=True, pack=8)
        w_ptrs += KT
        x_ptrs += KT
        offs_k += KT
    if FP8:
        part = tl.inline_asm_elementwise(_FP8_FINAL, _FP8_FINAL_IO, [acc], dtype=tl.float32,
                                         is_pure=True, pack=16)
        y = tl.sum(part, axis=1) * tl.load(ws_ptr + rows) * tl.load(xs_ptr)
    else:
        part = tl.inline_asm_elementwise(_BF16_FINAL, _BF16_FINAL_IO, [acc], dtype=tl.float32,
                                         is_pure=True, pack=8)
        y = tl.sum(part, axis=1)
    if SPLIT:
        tl.store(out_ptr + pid_k * N + offs_n, y, mask=offs_n < N)
    else:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def mma_gemv(x, xs, w, ws, block_n: int, num_warps: int, split: int) -> torch.Tensor:
    """x [1, K], w [N, K]: fp8 with xs [1] and ws [N] float32 scales, or bf16 (scales unread)
    → [1, N] float32."""
    n, k = w.shape
    fp8 = w.element_size() == 1
    kt = 64 if fp8 else 32
    per = triton.cdiv(triton.cdiv(k, kt), split) * kt
    split = triton.cdiv(k, per)
    out = torch.empty(split, n, dtype=torch.float32, device=w.device)
    _mma_gemv_kernel[(triton.cdiv(n, block_n), split)](
        x, xs, w, ws, out, n, k, w.stride(0), per, BLOCK_N=block_n, SPLIT=split > 1, FP8=fp8,
        num_warps=num_warps)
    return out.sum(0, keepdim=True) if split > 1 else out


def compile_only() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = _mma_gemv_kernel
    names = k.arg_names
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    for fp8 in (True, False):
        dt = "fp8e4nv" if fp8 else "bf16"
        sig = {"x_ptr": f"*{dt}", "xs_ptr": "*fp32", "w_ptr": f"*{dt}", "ws_ptr": "*fp32",
               "out_ptr": "*fp32", "N": "i32", "K": "i32", "stride_wn": "i32",
               "k_per_split": "i32", "BLOCK_N": "constexpr", "SPLIT": "constexpr",
               "FP8": "constexpr"}
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in sig
                 if sig[a] != "constexpr"}
        consts = {(names.index("BLOCK_N"),): 32, (names.index("SPLIT"),): False,
                  (names.index("FP8"),): fp8}
        c = triton.compile(ASTSource(k, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        cubin = Path(f"/tmp/mma_gemv_{dt}.cubin")
        cubin.write_bytes(c.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        layouts = sorted({ln.split("#ttg.blocked<")[1].split(">")[0]
                          for ln in c.asm["ttgir"].splitlines() if "#ttg.blocked<" in ln})
        mma = [ln.split("*/")[1].strip() for ln in sass.splitlines() if "MMA" in ln]
        print(f"{dt}: layouts {layouts}; {len(mma)} MMA instructions, e.g. {mma[:1]}")


def bench_shape(name: str, n: int, k: int, fp8: bool, copy: float, l2: int) -> None:
    """Accuracy against the float reference and µs against the CUDA-core kernel at its tuned
    config (the tensor-core one at a few tilings)."""
    from kestrel.kernels.fp8_gemm import bf16_gemm_small_m, fp8_gemm_small_m
    from kestrel.quant.fp8_ops import fp8_matmul_emulated, quantize_rowwise_ref
    from tests.quant.skinny_timing import time_us

    w = 0.02 * torch.randn(n, k, device="cuda")
    x = torch.randn(1, k, device="cuda")
    if fp8:
        w, ws = quantize_rowwise_ref(w)
        x, xs = quantize_rowwise_ref(x)
        ws, xs = ws.view(-1), xs.view(-1)
        ref = fp8_matmul_emulated(x, xs.view(1, 1), w, ws.view(-1, 1), torch.float32)
    else:
        w, x = w.bfloat16(), x.bfloat16()
        ws = xs = torch.ones(1, device="cuda")
        ref = x.float() @ w.float().T
    copies = [w] + [w.clone() for _ in range(max(1, triton.cdiv(4 * l2, w.nbytes)) - 1)]
    nbytes = w.nbytes

    def kernel(i: int) -> torch.Tensor:
        if fp8:
            return fp8_gemm_small_m(x, xs, copies[i], ws, torch.bfloat16)
        return bf16_gemm_small_m(x, copies[i])
    base = time_us(kernel, len(copies), 50)
    print(f"  {name}: kernel {base:6.2f} us {100 * nbytes / base / 1e3 / copy:5.1f}%")
    for block_n, warps, split in [(32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1), (32, 4, 2),
                                  (64, 4, 4)]:
        def run(i: int, b: int = block_n, nw: int = warps, sk: int = split) -> torch.Tensor:
            return mma_gemv(x, xs, copies[i], ws, b, nw, sk)
        try:
            err = float((run(0) - ref).abs().max() / ref.abs().max())
            us = time_us(run, len(copies), 50)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"    n{block_n} w{warps} s{split}: failed {str(e)[:100]}")
            continue
        print(f"    n{block_n} w{warps} s{split}: {us:6.2f} us "
              f"{100 * nbytes / us / 1e3 / copy:5.1f}%  rel.err {err:.1e}", flush=True)


# llama-3-8b decode GEMVs: the FP8 recipe's FFN at TP=1, bf16 linears at TP=1 and TP=2
CASES = {"fp8 gate_up": (28672, 4096, True), "fp8 down": (4096, 14336, True),
         "bf16 tp1 qkv": (6144, 4096, False), "bf16 tp1 o_proj": (4096, 4096, False),
         "bf16 tp1 down": (4096, 14336, False), "bf16 tp2 qkv": (3072, 4096, False),
         "bf16 tp2 o_proj": (4096, 2048, False), "bf16 tp2 gate_up": (14336, 4096, False),
         "bf16 tp2 down": (4096, 7168, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.compile:
        return compile_only()
    from tests.quant.skinny_timing import copy_bandwidth

    copy = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for name, (n, k, fp8) in CASES.items():
        bench_shape(name, n, k, fp8, copy, l2)


if __name__ == "__main__":
    main()
