"""The device's own ceilings: copy bandwidth and dense matmul rate per data type.

Every speed figure Kestrel reports is also stated as a fraction of these, measured in the same
process on the same device, so "achieved 60% of bandwidth" means 60% of what this machine
moved in a plain copy, not of a datasheet number.

- Copy bandwidth: ``dst.copy_(src)`` of a large buffer; bytes read + bytes written per second.
- Matmul rate: ``2·M·N·K`` FLOPs per second of square products, for float32 (the CPU default
  dtype), bfloat16, fp8 e4m3 with row-wise scales (``torch._scaled_mm``: an [M, 1] scale for
  the activation rows and a [1, N] scale for the weight rows, as the Llama 3 recipe; fast
  accumulation, the engine's default since the twenty-sixth session) and int8
  (``torch._int_mm``, int32 accumulation). The best over several sizes and runs is the
  ceiling.

Timing: CUDA events on GPU, ``time.perf_counter`` on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

MATMUL_DTYPES = ("float32", "bfloat16", "fp8_rowwise", "int8")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, iters: int = 5,
              warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Best seconds per call over at least ``iters`` timed calls and ``min_seconds`` of them.

    The best, not the mean: a ceiling is what the device can do, and on a shared machine the
    slower runs measure the neighbours.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    best, spent, n = float("inf"), 0.0, 0
    while n < iters or (spent < min_seconds and n < 1000):
        elapsed = _time_once(fn, device)
        best, spent, n = min(best, elapsed), spent + elapsed, n + 1
    return best


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, mib: int, iters: int = 5,
                   min_seconds: float = 0.0) -> float:
    """Bytes read + written per second by a device-to-device copy of ``mib`` MiB."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, iters, min_seconds=min_seconds)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_call(kind: str, n: int, device: torch.device) -> Callable[[], object]:
    """One n×n×n product of ``kind`` on fresh random operands, as a call to time."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a32 = torch.randn(n, n, generator=gen).to(device)
    b32 = torch.randn(n, n, generator=gen).to(device)
    if kind in ("float32", "bfloat16"):
        dt = torch.float32 if kind == "float32" else torch.bfloat16
        a, b = a32.to(dt), b32.to(dt)
        return lambda: torch.mm(a, b)
    if kind == "fp8_rowwise":
        fp8 = torch.float8_e4m3fn
        a, b = a32.to(fp8), b32.to(fp8).t()  # _scaled_mm wants the second operand column-major
        sa = torch.ones(n, 1, device=device)  # one scale per activation row
        sb = torch.ones(1, n, device=device)  # one scale per weight row (output column)
        # fast accumulation, as the engine's FP8 GEMMs run by default (--fp8-fast-accum)
        return lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)
    if kind == "int8":
        a = a32.clamp(-4, 4).to(torch.int8)
        b = b32.clamp(-4, 4).to(torch.int8).t().contiguous().t()  # column-major, as fp8's
        return lambda: torch._int_mm(a, b)
    raise ValueError(f"unknown matmul kind {kind!r}; known: {MATMUL_DTYPES}")


def matmul_rate(kind: str, n: int, device: torch.device, iters: int = 3,
                min_seconds: float = 0.0) -> float | None:
    """FLOP/s of an n×n×n product, or None where this device/torch cannot run the kind."""
    try:
        fn = matmul_call(kind, n, device)
        seconds = time_call(fn, device, iters, min_seconds=min_seconds)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return 2.0 * n**3 / seconds


def default_sizes(device: torch.device) -> tuple[list[int], list[int]]:
    """(copy MiB, matmul n) to try: large enough to leave caches and launch overhead behind.

    Several sizes, the best kept: on CPUs the BLAS rate still grows past n = 1024.
    """
    if device.type == "cuda":
        return [1024], [4096, 8192]
    return [256, 1024], [1024, 2048]


def _best(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return max(found) if found else None


def measure_roofline(device: str | torch.device = "cpu", copy_mib: list[int] | None = None,
                     matmul_n: list[int] | None = None, iters: int = 3,
                     kinds: tuple[str, ...] = MATMUL_DTYPES, min_seconds: float = 0.25) -> dict:
    """The ceilings as a dict: copy bandwidth (bytes/s) and matmul FLOP/s by kind, each the
    best over the sizes tried."""
    dev = torch.device(device)
    mib_default, n_default = default_sizes(dev)
    mibs, ns = list(copy_mib or mib_default), list(matmul_n or n_default)
    if min(mibs) < 1 or min(ns) < 16:
        raise ValueError(f"roofline sizes too small: copy {mibs} MiB (>= 1), matmul n {ns} "
                         f"(>= 16)")
    by_size = {k: {n: matmul_rate(k, n, dev, iters, min_seconds) for n in ns} for k in kinds}
    copy = {m: copy_bandwidth(dev, m, iters, min_seconds) for m in mibs}
    return {"device_type": dev.type, "copy_mib": mibs, "matmul_n": ns, "iters": iters,
            "copy_bandwidth_Bps": _best(list(copy.values())),
            "matmul_flops": {k: _best(list(v.values())) for k, v in by_size.items()},
            "copy_bandwidth_by_mib": copy, "matmul_flops_by_n": by_size}


def ceiling_kind(dtype: torch.dtype, quantization: str | None) -> str:
    """Which matmul ceiling a model's linear layers run against."""
    if quantization and quantization.startswith("fp8"):
        return "fp8_rowwise"
    if quantization and quantization.startswith("int8"):
        return "int8"
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "bfloat16")


def roofline_rows(result: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("copy bandwidth (GB/s, read+write)", result["copy_bandwidth_Bps"] / 1e9)]
    for kind, rate in result["matmul_flops"].items():
        rows.append((f"matmul {kind} (TFLOP/s, best of n={result['matmul_n']})",
                     None if rate is None else rate / 1e12))
    return rows
