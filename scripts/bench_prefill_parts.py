"""Variants of the parts of a long prefill, timed on one GPU (µs, median of CUDA-event timings):
how the SDPA path feeds grouped KV heads to cuDNN, how the fused SiLU-multiply + FP8
quantization tiles a row, whether the residual add rides in the GEMM's epilogue (cuBLAS's C
input, beta = 1) for less than the add costs in the norm kernel, the last layer's attention
for the sampled row only (``forward_kept``) against every row's, the FP8 GEMMs with and
without fast accumulation beside BF16, BF16 and FP8 GEMMs from Inductor's autotuned
templates against cuBLAS, FBGEMM's CUTLASS row-wise FP8 GEMM (the Llama 3 paper's, from the
``fbgemm-gpu-genai`` wheel) against cuBLAS's, W8A8's int8 GEMM (``torch._int_mm`` then the
scaling kernel) against BF16 and against Inductor's autotuned int8 GEMM with the scaling fused
into its epilogue. FlashAttention 4's and quack's kernels: ``scripts/bench_cute_kernels.py``.
Picks the defaults in kestrel.attention.triton_backend and kestrel.kernels.fp8_quant; prints
one line per variant with its effective bandwidth or rate.

    python scripts/bench_prefill_parts.py [--tokens 4096] [--heads 32 8] [--inter 14336]
        [--only sdpa silu residual kept scaled-mm autotune autotune-fp8 fbgemm int8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels import fp8_quant
from kestrel.kernels.fused import rms_norm, silu_and_mul

BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def timed(fn, reps: int = 20, queued: bool = False) -> float:
    """Median µs of ``fn`` over ``reps`` runs after 3 warm-up runs. ``queued``: the GPU sleeps
    ~1 ms before each run while the host queues it, so small kernels, which outrun their
    launches, are timed as kernels, not launches."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(2_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def bench_sdpa(t: int, hq: int, hk: int, d: int) -> None:
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.split([hq, hk, hk], dim=1)  # strided views, as the model's fused QKV output
    g = hq // hk
    flops = 2 * hq * d * t * (t + 1)

    def repeat_copy_out():  # today's path
        out = torch.empty_like(q)
        ki = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vi = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ki, vi, is_causal=True)
        out[:] = o[0].transpose(0, 1)
        return out

    def repeat_no_copy():
        ki = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vi = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ki, vi, is_causal=True)
        return o[0].transpose(0, 1).contiguous()

    def gqa():
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=True,
                                           enable_gqa=True)
        return o[0].transpose(0, 1).contiguous()

    ref = repeat_copy_out().float()
    with sdpa_kernel(BACKENDS, set_priority=True):
        for name, fn in (("repeat + copy out", repeat_copy_out),
                         ("repeat, no copy", repeat_no_copy), ("enable_gqa", gqa)):
            try:
                err = (fn().float() - ref).abs().max().item()
                us = timed(fn)
            except RuntimeError as e:
                print(f"sdpa t={t} {name:20} failed: {str(e)[:80]}")
                continue
            print(f"sdpa t={t} {name:20} {us:9.1f} µs  {flops / us / 1e6:7.1f} TFLOP/s  "
                  f"max |diff| {err:.2e}")
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None],
                                       k.repeat_interleave(g, 1).transpose(0, 1)[None],
                                       v.repeat_interleave(g, 1).transpose(0, 1)[None],
                                       is_causal=True)
    print(f"sdpa output strides {tuple(o.stride())} for shape {tuple(o.shape)}")


def bench_silu_quant(t: int, inter: int) -> None:
    x = torch.randn(t, 2 * inter, dtype=torch.bfloat16, device="cuda")
    ref_q, ref_s = fp8_quant.silu_and_mul_quant_fp8(x, 1200.0)
    moved = x.numel() * 2 + t * inter  # bytes read + FP8 written
    us = timed(lambda: silu_and_mul(x))
    print(f"silu_and_mul bf16 t={t}: {us:8.1f} µs  "
          f"{(x.numel() * 2 + t * inter * 2) / us / 1e3:7.0f} GB/s")
    for one_pass in (16384, 8192, 4096, 2048, 1024):
        q, s = fp8_quant.silu_and_mul_quant_fp8(x, 1200.0, max_one_pass=one_pass)
        same = torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
        us = timed(lambda n=one_pass: fp8_quant.silu_and_mul_quant_fp8(x, 1200.0,
                                                                         max_one_pass=n))
        print(f"silu_and_mul_quant t={t} max_one_pass {one_pass:5}: {us:8.1f} µs  "
              f"{moved / us / 1e3:7.0f} GB/s  same bits {same}")


def bench_residual_gemm(t: int, hidden: int, k: int) -> None:
    """o_proj (k = q size) or down_proj (k = intermediate) followed by the next norm: the GEMM,
    then the norm adding the residual (today), against the GEMM adding the residual as cuBLAS's
    C input, then a norm without one; where quack is installed, also quack's GEMM adding its
    product into the residual in place (``gemm_add`` with C = out: a TMA reduce-add store, so
    C is never loaded). Error of each against float32, in units of bf16's rounding of the
    result."""
    x = torch.randn(t, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(hidden, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5
    res = torch.randn(t, hidden, dtype=torch.bfloat16, device="cuda") * 4
    g = torch.rand(hidden, dtype=torch.bfloat16, device="cuda") + 0.5
    ref = x.float() @ w.float().t() + res.float()
    ulp = ref.abs().clamp_min(1e-3) * 2.0 ** -8

    def separate():
        return rms_norm(F.linear(x, w), g, 1e-5, res)

    def in_gemm():
        s = torch.addmm(res, x, w.t())
        return rms_norm(s, g, 1e-5)[0], s

    y = F.linear(x, w)
    variants = {"linear": lambda: F.linear(x, w),
                "addmm (C = residual)": lambda: torch.addmm(res, x, w.t()),
                "norm + residual add": lambda: rms_norm(y, g, 1e-5, res),
                "norm alone": lambda: rms_norm(y, g, 1e-5),
                "linear, then norm + add": separate,
                "addmm, then norm": in_gemm}
    checked = {"linear, then norm + add": separate, "addmm, then norm": in_gemm}
    try:
        from quack.gemm_interface import gemm_add
    except ImportError:
        gemm_add = None
    if gemm_add is not None:
        acc = res.clone()  # the timed runs add into it again and again: only time matters

        def quack_in_place(r: torch.Tensor):
            gemm_add(x, w.t(), r, out=r, tuned=False)
            return rms_norm(r, g, 1e-5)[0], r

        variants["quack residual += x·Wᵀ"] = lambda: gemm_add(x, w.t(), acc, out=acc, tuned=False)
        variants["quack += , then norm"] = lambda: quack_in_place(acc)
        checked["quack += , then norm"] = lambda: quack_in_place(res.clone())
    for name, fn in variants.items():
        us = timed(fn)
        print(f"residual t={t} k={k:5} {name:24} {us:8.1f} µs")
    for name, fn in checked.items():
        s = fn()[1].float()
        print(f"residual t={t} k={k:5} {name:24} sum error max {((s - ref).abs() / ulp).max():.2f}"
              f" mean {((s - ref).abs() / ulp).mean():.3f} bf16 ulps")


def bench_kept(t: int, hq: int, hk: int, d: int) -> None:
    """One prompt of t tokens through the Triton backend (rotary, cache write, attention):
    every row's attention (``forward``), its last row's only (``forward_kept``, the last layer
    of a prefill that samples), and none (a middle chunk's last layer)."""
    from kestrel.attention.base import AttentionMetadata, KeptRows
    from kestrel.attention.triton_backend import TritonAttention
    from kestrel.layers.rotary import RotaryEmbedding

    bs, dev = 16, "cuda"
    nb = -(-t // bs)
    kc = torch.zeros(nb, bs, hk, d, dtype=torch.bfloat16, device=dev)
    vc = torch.zeros_like(kc)
    i32 = {"dtype": torch.int32, "device": dev}
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t, device=dev), query_start_loc=torch.tensor([0, t], **i32),
        seq_lens=torch.tensor([t], **i32), block_tables=torch.arange(nb, **i32)[None],
        max_query_len=t, max_seq_len=t, seq_lens_cpu=[t], query_lens_cpu=[t])
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=torch.bfloat16, device=dev)
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    rope = {"positions": torch.arange(t, device=dev),
            "cos_sin": RotaryEmbedding(d, t, 500000.0, None).cos_sin.to(dev)}
    backend = TritonAttention(hq, hk, d, d ** -0.5)
    last = torch.tensor([t - 1], device=dev)
    one, none = KeptRows(last, torch.zeros_like(last), [0]), KeptRows(last[:0], last[:0], [])
    # (timed runs rotate q and k in place again and again: compare on fresh copies first)
    ref = backend.forward(q.clone(), k.clone(), v, kc, vc, meta, **rope)[t - 1].float()
    got = backend.forward_kept(q.clone(), k.clone(), v, kc, vc, meta, one, **rope)[0].float()
    print(f"kept t={t} last row against every row's: max |diff| {(got - ref).abs().max():.2e}")
    for name, fn in (
            ("every row (forward)", lambda: backend.forward(q, k, v, kc, vc, meta, **rope)),
            ("last row (forward_kept)",
             lambda: backend.forward_kept(q, k, v, kc, vc, meta, one, **rope)),
            ("no row (forward_kept)",
             lambda: backend.forward_kept(q, k, v, kc, vc, meta, none, **rope))):
        print(f"kept t={t} {name:24} {timed(fn):9.1f} µs, queued {timed(fn, queued=True):9.1f} µs")


def bench_scaled_mm(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """[t, k] × [n, k]ᵀ at the 8B's prefill shapes (qkv, o_proj, gate_up, down): BF16
    ``F.linear``, and FP8 through ``_scaled_mm`` with row-wise scales as the engine calls it,
    fast accumulation off (``--no-fp8-fast-accum``) or on (the default), each FP8 run with its
    relative (Frobenius) error against the exact product of its operands. (The twenty-third
    session also timed per-tensor scales and torch's cuBLASLt preference: no faster.)"""
    for n, k in ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)):
        _bench_gemm_shape(t, n, k)


def _bench_gemm_shape(t: int, n: int, k: int) -> None:
    fp8 = torch.float8_e4m3fn
    x = torch.randn(t, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    xq, wq = x.to(fp8), w.to(fp8)
    xs, ws = torch.rand(t, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    runs = [("bf16 F.linear", lambda: F.linear(x, w))]
    for fast in (False, True):
        runs.append((f"fp8 row-wise fast_accum={fast}", lambda f=fast: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=f)))
    # the error of each against the exact product of the quantized operands (float32 math)
    exact = (xq.float() * xs) @ (wq.float() * ws.t()).t()
    for name, fn in runs:
        us = timed(fn)
        err = "" if name.startswith("bf16") else \
            f"  error {float((fn().float() - exact).norm() / exact.norm()):.2e}"
        print(f"gemm t={t} n={n:5} k={k:5} {name:30} {us:8.1f} µs "
              f"{2 * t * n * k / us / 1e6:7.1f} TFLOP/s{err}")


def bench_autotune(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """BF16 [t, k] × [n, k]ᵀ through cuBLAS (``F.linear``) and through Inductor's
    ``max-autotune`` choice among its GEMM templates (Triton; CUTLASS where installed) and
    cuBLAS, at the attention projections' shapes, where cuBLAS trails its own rate on the
    FFN's gate_up (the control)."""
    for n, k in ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden)):
        x = torch.randn(t, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5
        tuned = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs",
                              dynamic=False)
        diff = float((tuned(x, w).float() - F.linear(x, w).float()).abs().max())
        for name, fn in (("cuBLAS", lambda: F.linear(x, w)),  # noqa: B023 (called at once)
                         ("max-autotune", lambda: tuned(x, w))):  # noqa: B023
            us = timed(fn)
            print(f"autotune t={t} n={n:5} k={k:5} {name:13} {us:8.1f} µs "
                  f"{2 * t * n * k / us / 1e6:7.1f} TFLOP/s  max |diff| {diff:.1e}")


def bench_autotune_fp8(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """FP8 [t, k] × [n, k]ᵀ with row-wise scales and fast accumulation, as the engine calls
    ``_scaled_mm``: cuBLAS (one 128 × 128-tile kernel for every such shape in the twenty-first
    session's traces) against Inductor's ``max-autotune`` choice, which also times its Triton
    scaled-mm templates (persistent, TMA) with larger tiles. A faster FP8 GEMM is what issue 6's
    prefill ratios wait on (PERFORMANCE.md, "Why the FP8 prefill ratios stop")."""
    fp8 = torch.float8_e4m3fn
    for n, k in ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)):
        xq = torch.randn(t, k, device="cuda").to(fp8)
        wq = (torch.randn(n, k, device="cuda") * 4).to(fp8)
        xs, ws = torch.rand(t, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5

        def gemm(a, b, sa, sb):
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)
        tuned = torch.compile(gemm, mode="max-autotune-no-cudagraphs", dynamic=False)
        exact = (xq.float() * xs) @ (wq.float() * ws.t()).t()
        for name, fn in (("cuBLAS", gemm), ("max-autotune", tuned)):
            out = fn(xq, wq, xs, ws)
            err = float((out.float() - exact).norm() / exact.norm())
            us = timed(lambda f=fn: f(xq, wq, xs, ws))  # noqa: B023 (called at once)
            print(f"autotune-fp8 t={t} n={n:5} k={k:5} {name:13} {us:8.1f} µs "
                  f"{2 * t * n * k / us / 1e6:7.1f} TFLOP/s  error {err:.2e}")


def bench_fbgemm(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """FP8 [t, k] × [n, k]ᵀ with row-wise scales: torch's ``_scaled_mm`` (cuBLAS, one 128 × 128
    tile kernel) against FBGEMM's ``f8f8bf16_rowwise`` (CUTLASS, tiles picked per shape), each
    with fast accumulation off and on, with its error against the exact product; then one
    layer's four GEMMs 32 times back to back (a prefill's sustained clocks) per kernel."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401 (registers torch.ops.fbgemm)

    fp8, shapes = torch.float8_e4m3fn, ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden),
                                        (hidden, inter))
    kernels = {
        "cublas": lambda a, b, sa, sb, f: torch._scaled_mm(
            a, b.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1), out_dtype=torch.bfloat16,
            use_fast_accum=f),
        "fbgemm": lambda a, b, sa, sb, f: torch.ops.fbgemm.f8f8bf16_rowwise(
            a, b, sa, sb, use_fast_accum=f),
    }
    operands = []
    for n, k in shapes:
        xq = torch.randn(t, k, device="cuda").to(fp8)
        wq = (torch.randn(n, k, device="cuda") * 4).to(fp8)
        xs, ws = torch.rand(t, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
        operands.append((xq, wq, xs, ws))
        exact = (xq.float() * xs[:, None]) @ (wq.float() * ws[:, None]).t()
        for name, gemm in kernels.items():
            for fast in (False, True):
                err = float((gemm(xq, wq, xs, ws, fast).float() - exact).norm() / exact.norm())
                us = timed(lambda g=gemm, f=fast: g(xq, wq, xs, ws, f))  # noqa: B023
                print(f"fbgemm t={t} n={n:5} k={k:5} {name:7} fast_accum={fast!s:5} {us:8.1f} µs "
                      f"{2 * t * n * k / us / 1e6:7.1f} TFLOP/s  error {err:.2e}")
    flop = 32 * sum(2 * t * n * k for n, k in shapes)
    for name, gemm in kernels.items():
        def layers(g=gemm):
            for _ in range(32):
                for ops in operands:
                    g(*ops, True)
        us = timed(layers, reps=5)
        print(f"fbgemm t={t} 32 layers' GEMMs {name:7} fast_accum=True {us / 1e3:8.2f} ms "
              f"{flop / us / 1e6:7.1f} TFLOP/s")


def bench_int8(t: int, hidden: int, q_kv: int, inter: int) -> None:
    """W8A8's prefill GEMM [t, k] × [n, k]ᵀ of int8 codes with row scales: BF16 ``F.linear``
    (the baseline), ``torch._int_mm`` alone, the engine's ``_int_mm`` + ``scale_int32`` (the
    int32 product makes a round trip through memory), and Inductor's ``max-autotune`` of the
    same function, which may fuse the scaling into a Triton GEMM's epilogue."""
    from kestrel.kernels.int8_w8a8 import scale_int32

    def engine(a, b, sa, sb):
        return scale_int32(torch._int_mm(a, b.t()), sa, sb, torch.bfloat16)

    def fused(a, b, sa, sb):
        return (torch._int_mm(a, b.t()).float() * sa * sb.t()).to(torch.bfloat16)
    tuned = torch.compile(fused, mode="max-autotune-no-cudagraphs", dynamic=False)
    for n, k in ((q_kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)):
        x = torch.randn(t, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        xq = torch.randint(-127, 128, (t, k), dtype=torch.int8, device="cuda")
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        xs, ws = torch.rand(t, 1, device="cuda") * 1e-3, torch.rand(n, 1, device="cuda") * 1e-3
        want = engine(xq, wq, xs, ws).float()
        for name, fn in (("bf16 F.linear", lambda: F.linear(x, w)),  # noqa: B023
                         ("_int_mm", lambda: torch._int_mm(xq, wq.t())),  # noqa: B023
                         ("_int_mm + scale_int32", lambda: engine(xq, wq, xs, ws)),  # noqa: B023
                         ("max-autotune fused", lambda: tuned(xq, wq, xs, ws))):  # noqa: B023
            diff = "" if "scale" not in name and "fused" not in name else \
                f"  max |diff| {float((fn().float() - want).abs().max()):.1e}"
            us = timed(fn)
            print(f"int8 t={t} n={n:5} k={k:5} {name:22} {us:8.1f} µs "
                  f"{2 * t * n * k / us / 1e6:7.1f} TOP/s{diff}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--inter", type=int, default=14336)
    parts = ["sdpa", "silu", "residual", "kept", "scaled-mm", "autotune", "autotune-fp8",
             "fbgemm", "int8"]
    p.add_argument("--only", nargs="+", choices=parts, default=parts)
    ns = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for t in ns.tokens:
        if "sdpa" in ns.only:
            bench_sdpa(t, *ns.heads, ns.head_dim)
        if "silu" in ns.only:
            bench_silu_quant(t, ns.inter)
        if "residual" in ns.only:
            hidden = ns.heads[0] * ns.head_dim
            for k in (hidden, ns.inter):
                bench_residual_gemm(t, hidden, k)
        if "kept" in ns.only:
            bench_kept(t, *ns.heads, ns.head_dim)
        hq, hk = ns.heads
        shapes = (hq * ns.head_dim, (hq + 2 * hk) * ns.head_dim, ns.inter)
        if "scaled-mm" in ns.only:
            bench_scaled_mm(t, *shapes)
        if "autotune" in ns.only:
            bench_autotune(t, *shapes)
        if "autotune-fp8" in ns.only:
            bench_autotune_fp8(t, *shapes)
        if "fbgemm" in ns.only:
            bench_fbgemm(t, *shapes)
        if "int8" in ns.only:
            bench_int8(t, *shapes)


if __name__ == "__main__":
    main()
