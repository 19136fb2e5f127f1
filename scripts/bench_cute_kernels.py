"""FlashAttention 4's and quack's CuTe-DSL kernels (``scripts/fa4_carry.sh`` carries them to
the GPU machine) against what the engine runs without them, timed on one GPU: one prompt's
causal attention against cuDNN; quack's GEMMs against cuBLAS, plain and gate_up with SwiGLU in
the epilogue, BF16 (the engine's ``gate_up_swiglu``) and FP8 with the recipe's scales. One
line per variant with its rate, first call's seconds and error.

    python scripts/bench_cute_kernels.py [--tokens 4096] [--heads 32 8] [--inter 14336]
        [--only fa4 quack quack-gated quack-fp8]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_prefill_parts import timed  # this folder is sys.path[0]

from kestrel.kernels import fp8_quant
from kestrel.kernels.fused import silu_and_mul


def quack_attr(module: str, name: str):
    """``quack.<module>.<name>``, or None (said once) where quack is not installed."""
    try:
        return getattr(importlib.import_module(f"quack.{module}"), name)
    except ImportError as e:
        print(f"quack: not importable ({e})")
        return None


def bench_fa4(t: int, hq: int, hk: int, d: int) -> None:
    """One prompt's causal attention: the engine's cuDNN call (``_attend`` + the layout
    copy) against FlashAttention 4's CuTe-DSL kernels (``flash_attn.cute``, SM90 path) on
    the fresh K/V and over the paged cache (16-token pages as the engine's, and 128-token
    pages, a whole key tile, which FA4 loads by TMA). Timed queued (kernel time) and back to
    back (``triton.testing.do_bench``)."""
    import triton
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError as e:
        print(f"fa4: flash_attn.cute not importable ({e})")
        return
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    flops = 2 * hq * d * t * (t + 1)
    scale = d ** -0.5
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    used = torch.tensor([t], dtype=torch.int32, device="cuda")

    def cudnn():
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
        o = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k4, v4, None, True, 0.0, True, False, scale=scale)[0]
        return o[0].transpose(0, 1).contiguous()

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def fa4():
        return first(flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                            max_seqlen_q=t, max_seqlen_k=t, causal=True,
                                            softmax_scale=scale))

    def paged(page: int):
        nb = t // page
        perm = torch.randperm(nb, device="cuda")
        kc = torch.empty(nb, page, hk, d, dtype=q.dtype, device="cuda")
        vc = torch.empty_like(kc)
        kc[perm] = k.reshape(nb, page, hk, d)
        vc[perm] = v.reshape(nb, page, hk, d)
        table = perm.to(torch.int32)[None]
        return lambda: first(flash_attn_varlen_func(
            q, kc, vc, cu_seqlens_q=cu, seqused_k=used, page_table=table, max_seqlen_q=t,
            max_seqlen_k=t, causal=True, softmax_scale=scale))

    ref = cudnn().float()
    for name, fn in (("cuDNN (engine)", cudnn), ("fa4 fresh K/V", fa4),
                     ("fa4 paged 16", paged(16)), ("fa4 paged 128", paged(128))):
        try:
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            err = (out.float() - ref).abs().max().item()
            us_q = timed(fn, queued=True)
            us_b = triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3
        except Exception as e:  # noqa: BLE001 (a variant FA4 refuses is a result too)
            print(f"fa4 t={t} {name:15} failed: {type(e).__name__}: {str(e)[:160]}")
            continue
        print(f"fa4 t={t} {name:15} queued {us_q:8.1f} µs {flops / us_q / 1e6:6.1f} TFLOP/s"
              f"  back to back {us_b:8.1f} µs {flops / us_b / 1e6:6.1f}  first call "
              f"{first_s:6.2f} s  max |diff| {err:.1e}")


def bench_quack(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """Tri Dao's quack GEMMs (CuTe DSL, ``quack-kernels``, carried with FA4) against cuBLAS
    at the 8B's four GEMM shapes (autotuned per shape)."""
    import triton
    gemm_out = quack_attr("gemm_interface", "gemm_out")
    if gemm_out is None:
        return
    bf16 = torch.bfloat16
    x = torch.randn(t, hidden, dtype=bf16, device="cuda")
    for n, k in ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)):
        a = x if k == hidden else torch.randn(t, k, dtype=bf16, device="cuda")
        w = torch.randn(n, k, dtype=bf16, device="cuda") * k ** -0.5
        out = torch.empty(t, n, dtype=bf16, device="cuda")
        try:
            gemm_out(a, w.t(), out)
            diff = float((out.float() - F.linear(a, w).float()).abs().max())
            fns = (("cuBLAS", lambda: F.linear(a, w)),  # noqa: B023 (called at once)
                   ("quack", lambda: gemm_out(a, w.t(), out)))  # noqa: B023
            for name, fn in fns:
                us = triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3
                print(f"quack t={t} n={n:5} k={k:5} {name:7} {us:8.1f} µs "
                      f"{2 * t * n * k / us / 1e6:7.1f} TFLOP/s  max |diff| {diff:.1e}")
        except Exception as e:  # noqa: BLE001 (a shape quack refuses is a result too)
            print(f"quack t={t} n={n} k={k} failed: {type(e).__name__}: {str(e)[:160]}")


def time_variants(tag: str, flops: float, variants: dict, error) -> None:
    """One line per variant: its first call's seconds (a compile shows there), then
    ``do_bench``'s µs and TFLOP/s, and ``error(result)``; a variant that raises is a line too
    (what a third-party kernel refuses is a result)."""
    import triton
    for name, fn in variants.items():
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            us = triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3
            print(f"{tag} {name:36} {us:8.1f} µs {flops / us / 1e6:7.1f} TFLOP/s  first call "
                  f"{first:6.2f} s  max err/(|ref|+1) {error(result):.1e}")
        except Exception as e:  # noqa: BLE001
            print(f"{tag} {name} failed: {type(e).__name__}: {str(e)[:300]}")


def bench_quack_gated(t: int, hidden: int, inter: int) -> None:
    """gate_up with SwiGLU in quack's epilogue against ``F.linear`` + the engine's
    ``silu_and_mul`` (2.6 ms of a 4k prefill): weights interleaved (g0, u0, g1, ...) and as the
    engine stores them ([gate; up], ``concat_layout``), quack's default config (one compile
    serves every row count) and its autotuned one (tuned per shape)."""
    gemm_gated_out = quack_attr("gemm_interface", "gemm_gated_out")
    if gemm_gated_out is None:
        return
    bf16 = torch.bfloat16
    x = torch.randn(t, hidden, dtype=bf16, device="cuda")
    w = torch.randn(2 * inter, hidden, dtype=bf16, device="cuda") * hidden ** -0.5
    w_il = w.view(2, inter, hidden).transpose(0, 1).reshape(2 * inter, hidden)  # g0, u0, g1..
    gate, up = F.linear(x.float(), w.float()).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = torch.empty(t, inter, dtype=bf16, device="cuda")
    variants = {"F.linear + silu_and_mul": lambda: out.copy_(silu_and_mul(F.linear(x, w)))}
    for tuned in (False, True):
        tag = "tuned" if tuned else "default"
        variants[f"quack interleaved {tag}"] = lambda tuned=tuned: gemm_gated_out(
            x, w_il.t(), None, out, activation="swiglu", tuned=tuned) or out
        variants[f"quack [gate; up] {tag}"] = lambda tuned=tuned: gemm_gated_out(
            x, w.t(), None, out, activation="swiglu", concat_layout="B", tuned=tuned) or out
    time_variants(f"quack-gated t={t:5}", 2 * t * 2 * inter * hidden, variants,
                  lambda o: float(((o.float() - ref).abs() / (ref.abs() + 1)).max()))


def bench_quack_fp8_gated(t: int, hidden: int, inter: int) -> None:
    """The FP8 recipe's gate_up → SwiGLU → quantize for down_proj: the engine's
    ``torch._scaled_mm`` (row-wise scales) + ``silu_and_mul_quant_fp8`` (reads the [T, 2I] bf16
    product), against quack's FP8 GEMM with the row (token) and column (weight) scales and
    SwiGLU in its epilogue (``norm_act_mod``: acc · colvec · rowvec, gated), storing only the
    [T, I] bf16 product, then ``per_token_quant_fp8`` of it (default config, and autotuned for
    this row count: the default ran at 79 TFLOP/s). Promoted accumulation both ways
    (``use_fast_accum`` off; quack's SM90 FP8 default). Error: the down_proj input
    (dequantized) against the float32 SwiGLU of the same FP8 operands."""
    norm_act_mod = quack_attr("epilogue.library", "norm_act_mod")
    if norm_act_mod is None:
        return
    from kestrel.quant.fp8_ops import quantize_rowwise_ref
    x = torch.randn(t, hidden, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(2 * inter, hidden, dtype=torch.bfloat16, device="cuda") * hidden ** -0.5
    xq, xs = fp8_quant.per_token_quant_fp8(x, 1200.0)  # [t, H] fp8, [t, 1]
    wq, ws = quantize_rowwise_ref(w)  # [2I, H] fp8, [2I, 1]
    gate, up = ((xq.float() @ wq.float().t()) * xs * ws.view(1, -1)).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    mod = norm_act_mod("swiglu", gated=True, has_c=False, has_rowvec=True, has_colvec=True)
    post = torch.empty(t, inter, dtype=torch.bfloat16, device="cuda")

    def engine():
        h = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1),
                             out_dtype=torch.bfloat16)
        return fp8_quant.silu_and_mul_quant_fp8(h, 1200.0)

    def quack(vec_2d: bool, tuned: bool = False):
        rows, cols = (xs.view(1, -1), ws.view(1, -1)) if vec_2d else (xs.view(-1), ws.view(-1))
        mod(xq, wq.t(), None, out={"mAuxOut": post}, store_d=False, tuned=tuned,
            concat_layout=("B", "mRowVecBroadcast"), mColVecBroadcast=rows,
            mRowVecBroadcast=cols)
        return fp8_quant.per_token_quant_fp8(post, 1200.0)

    time_variants(f"quack-fp8 t={t:5}", 2 * t * 2 * inter * hidden, {
        "_scaled_mm + silu_and_mul_quant": engine,
        "quack gated fp8 + quant": lambda: quack(False),
        "quack gated fp8 + quant (2-d vecs)": lambda: quack(True),
        "quack gated fp8 + quant (2-d, tuned)": lambda: quack(True, tuned=True)},
        lambda qs: float(((qs[0].float() * qs[1] - ref).abs() / (ref.abs() + 1)).max()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--inter", type=int, default=14336)
    parts = ["fa4", "quack", "quack-gated", "quack-fp8"]
    p.add_argument("--only", nargs="+", choices=parts, default=parts)
    ns = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    hq, hk = ns.heads
    hidden, q_kv = hq * ns.head_dim, (hq + 2 * hk) * ns.head_dim
    for t in ns.tokens:
        if "fa4" in ns.only:
            bench_fa4(t, hq, hk, ns.head_dim)
        if "quack" in ns.only:
            bench_quack(t, hidden, q_kv, ns.inter)
        if "quack-gated" in ns.only:
            bench_quack_gated(t, hidden, ns.inter)
        if "quack-fp8" in ns.only:
            bench_quack_fp8_gated(t, hidden, ns.inter)


if __name__ == "__main__":
    main()
