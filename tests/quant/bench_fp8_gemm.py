"""Benchmark the FP8 skinny GEMM on CUDA (a plain script; pytest does not collect bench_*.py).

    python tests/quant/bench_fp8_gemm.py [--m 1 4 16] [--quick] [--rep 100]

Llama 3 8B FFN shapes (gate_up 4096→28672, down 14336→4096) at decode batch sizes M: bf16
F.linear vs torch._scaled_mm (row-wise scales) vs fp8_gemm_small_m with its default config and
the best of a small config sweep. Timed in a CUDA graph (as the engine runs decode) with
triton.testing.do_bench_cudagraph; each timed call runs the GEMM over several weight copies (≥ 4×
L2 in all), as 32 layers would, so no weight is served from L2. GB/s = weight bytes / time,
against a device-to-device copy on the same card. Every kernel's output is checked against the
float32 emulation first. The summary gives the row count up to which the skinny GEMM beats
_scaled_mm on both shapes (kestrel.quant.fp8_ops.SMALL_M_MAX) and the best configs found
(for kestrel.kernels.fp8_gemm.default_config).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, uninstalled
from kestrel.kernels.fp8_gemm import SkinnyConfig, default_config, fp8_gemm_small_m, sm_count
from kestrel.quant.fp8_ops import SMALL_M_MAX, fp8_matmul_emulated, quantize_rowwise_ref

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}  # name → (N, K)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def sweep_configs(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """Variations around default_config: tile sizes, warps, stages, split-K off and on."""
    tiles = [(64, 128, 4, 3), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 3),
             (128, 256, 8, 3), (32, 256, 4, 3)]  # tensor-core dot: (bn, bk, warps, stages)
    out = [SkinnyConfig(bn, bk, 1, True, w, s) for bn, bk, w, s in tiles]
    if m == 1:
        fma = [(8, 512, 4, 3), (16, 512, 4, 1), (16, 512, 4, 3), (16, 1024, 8, 3),
               (32, 256, 4, 3), (32, 512, 8, 3), (8, 1024, 4, 2)]
        out += [SkinnyConfig(bn, bk, 1, False, w, s) for bn, bk, w, s in fma]
    with_split = []
    for c in out:  # the default's rule for split-K, applied to each tile
        split = max(1, min(triton.cdiv((2 if c.use_dot else 4) * sms, triton.cdiv(n, c.block_n)),
                           triton.cdiv(k, c.block_k) // 2))
        with_split += [c] + ([SkinnyConfig(c.block_n, c.block_k, split, c.use_dot, c.num_warps,
                                           c.num_stages)] if split > 1 else [])
    return with_split


def _describe(c: SkinnyConfig) -> str:
    kind = "dot" if c.use_dot else "fma"
    return f"{kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"


def _time_us(fn: Callable[[int], torch.Tensor], copies: int, rep: int) -> float:
    """µs per GEMM: one timed call runs it on every weight copy, replayed in a CUDA graph."""
    def all_copies() -> None:
        for i in range(copies):
            fn(i)

    all_copies()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(all_copies, rep=rep, return_mode="median") * 1e3 \
        / copies


def _correct(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.isfinite(y).all()) and float((y.float() - ref).abs().max()) <= \
        1e-2 * float(ref.abs().max())


def _weights(n: int, k: int, l2_bytes: int) -> dict:
    """Weight copies, bf16 and fp8, each set ≥ 4× L2 (as 32 layers would stream them)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = 0.02 * torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    wq, ws = quantize_rowwise_ref(w)
    n_fp8, n_bf16 = (max(2, triton.cdiv(4 * l2_bytes, n * k * b)) for b in (1, 2))
    return {"ws": ws, "wq": [wq] + [wq.clone() for _ in range(n_fp8 - 1)],
            "wb": [w] + [w.clone() for _ in range(n_bf16 - 1)]}


def _activation(op: dict, m: int, k: int) -> None:
    """Adds x [M, K] bf16, its quantization and the float32 reference output to ``op``."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_rowwise_ref(x)
    op.update(x=x, xq=xq, xs=xs, ref=fp8_matmul_emulated(xq, xs, op["wq"][0], op["ws"],
                                                          torch.float32))


def _row(name: str, m: int, kernel: str, config: str, us: float, nbytes: int, peak: float,
         base_us: float) -> None:
    gbs = nbytes / us / 1e3
    print(f"{name:>8} {m:>3}  {kernel:<12} {config:<28} {us:>8.1f} {gbs:>8.0f} "
          f"{100 * gbs / peak:>5.0f}% {base_us / us:>6.2f}x")


def bench_case(name: str, op: dict, m: int, sweep: bool, rep: int, peak: float,
               sms: int) -> dict[str, tuple[float, str]]:
    """Time one (shape, M); returns kernel → (µs, config) for the summary."""
    _activation(op, m, op["wq"][0].shape[1])
    (n, k), xq, xs, ws, ref = op["wq"][0].shape, op["xq"], op["xs"], op["ws"], op["ref"]
    res: dict[str, tuple[float, str]] = {}
    base = _time_us(lambda i: F.linear(op["x"], op["wb"][i]), len(op["wb"]), rep)
    _row(name, m, "bf16 linear", "-", base, 2 * n * k, peak, base)
    try:
        def smm(i: int) -> torch.Tensor:
            return torch._scaled_mm(xq, op["wq"][i].t(), scale_a=xs, scale_b=ws.view(1, -1),
                                    out_dtype=torch.bfloat16)
        ok = _correct(smm(0), ref)
        res["scaled_mm"] = (_time_us(smm, len(op["wq"]), rep), "-")
        _row(name, m, "_scaled_mm", "-" if ok else "WRONG", res["scaled_mm"][0], n * k, peak,
             base)
    except RuntimeError as e:
        print(f"{name:>8} {m:>3}  _scaled_mm   fails: {str(e).splitlines()[0][:60]}")
    configs = [default_config(m, n, k, sms)] + (sweep_configs(m, n, k, sms) if sweep else [])
    for j, cfg in enumerate(configs):
        def skinny(i: int, cfg: SkinnyConfig = cfg) -> torch.Tensor:
            return fp8_gemm_small_m(xq, xs, op["wq"][i], ws, torch.bfloat16, config=cfg)
        try:
            ok = _correct(skinny(0), ref)
            us = _time_us(skinny, len(op["wq"]), rep)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"{name:>8} {m:>3}  skinny       {_describe(cfg):<28} fails: {e!r:.60}")
            continue
        kind = "skinny" if j == 0 else "  sweep"
        _row(name, m, kind, _describe(cfg) + ("" if ok else " WRONG"), us, n * k, peak, base)
        if j == 0:
            res["skinny"] = (us, _describe(cfg))
        if ok and us < res.get("best", (float("inf"), ""))[0]:
            res["best"] = (us, _describe(cfg))
    return res


def summary(results: dict[tuple[str, int], dict[str, tuple[float, str]]], ms: list[int]) -> None:
    """The row count up to which the skinny GEMM beats _scaled_mm on every shape."""
    print("\nsummary (µs: skinny default / best of sweep / _scaled_mm)")
    for (name, m), r in sorted(results.items()):
        sk, best, smm = (r.get(key, (float("nan"), "-")) for key in ("skinny", "best",
                                                                    "scaled_mm"))
        print(f"{name:>8} M={m:<3} {sk[0]:>8.1f} {best[0]:>8.1f} {smm[0]:>8.1f}   best: {best[1]}")
    for key in ("skinny", "best"):
        limit = 0
        for m in sorted(ms):
            wins = all(results[(name, m)].get(key, (float("inf"),))[0] <
                       results[(name, m)].get("scaled_mm", (float("inf"),))[0] for name in SHAPES)
            if not wins:
                break
            limit = m
        print(f"skinny ({'default config' if key == 'skinny' else 'best configs'}) beats "
              f"_scaled_mm on all shapes for M <= {limit} of {sorted(ms)} "
              f"(SMALL_M_MAX is {SMALL_M_MAX})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="batch rows to time")
    ap.add_argument("--quick", action="store_true", help="default configs only, no sweep")
    ap.add_argument("--rep", type=int, default=100, help="ms of replays per timing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    sms = sm_count("cuda", 0)
    peak = copy_bandwidth()
    print(f"# {props.name}  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"torch {torch.__version__}  triton {triton.__version__}  SMs {sms}  L2 {l2 >> 20} MiB")
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# device-to-device copy: {peak:.0f} GB/s; weight GB/s below; x: speedup vs bf16")
    print(f"{'shape':>8} {'M':>3}  {'kernel':<12} {'config':<28} {'us':>8} {'GB/s':>8} "
          f"{'%copy':>6} {'vs bf16':>7}")
    results = {}
    for name, (n, k) in SHAPES.items():
        op = _weights(n, k, l2)
        for m in args.m:
            results[(name, m)] = bench_case(name, op, m, not args.quick, args.rep, peak, sms)
        del op
        torch.cuda.empty_cache()
    summary(results, args.m)


if __name__ == "__main__":
    main()
