"""Every Triton kernel variant the CPU tests launch also compiles for a Hopper GPU (sm_90).

The interpreter runs kernels as Python and does not check what the compiler does (a variable
whose type changes inside a runtime ``if`` ran on CPU and failed to compile on an H200). So
the launches of a few representative calls are recorded, each under its CUDA settings
(hardware FP8 cast, tensor-core dots), and compiled ahead of time to a cubin for sm_90 in a
fresh process without the interpreter (it patches triton.language in place): no GPU needed. On
a CUDA machine the other tests compile them for real, so this one is skipped there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("CUDA present: the kernel tests compile every kernel for it",
                allow_module_level=True)
from triton.runtime.interpreter import InterpretedFunction

from kestrel.attention.base import FP8_DTYPE
from kestrel.kernels import (
    attention_common,
    fp8_gemm,
    fp8_quant,
    fused,
    int8_w8a8,
    paged_attention,
    rotary,
    skinny_config,
)
from kestrel.kernels.prefill_attention import gather_kv, merge_attention, prefill_attention

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8",
         FP8_DTYPE: "fp8e4nv"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def _record(monkeypatch) -> list[tuple]:
    launches: list[tuple] = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, args, kwargs))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


def _on_cuda(values: dict) -> dict:
    """The constexprs the wrappers pass on CUDA instead of their interpreter settings."""
    cuda = {"HW_CAST": True}  # sm_90 has the e4m3 conversion (fp8_quant.hw_fp8_cast)
    if "HW" in values:  # and cvt.rn for round_dtype (the skinny GEMM's SwiGLU fold)
        cuda["HW"] = True
    if "PDL" in values:  # and programmatic dependent launch (kernels.pdl)
        cuda["PDL"] = True
    if "UPCAST" in values:  # attention dots: attention_common.dot_flags for q's dtype
        cuda |= attention_common.dot_flags(next(iter(values.values())).dtype,
                                          torch.device("cuda"),
                                          values["k_cache_ptr"].dtype == FP8_DTYPE)
    if "DOT_F32" in values:  # the skinny GEMM: fp32 dots only for fp32 weights there
        cuda["DOT_F32"] = values["DOT_F32"] and values["w_ptr"].dtype == torch.float32
    return cuda


def _spec(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, with the CUDA settings."""
    jit = triton.JITFunction(fn)
    names = jit.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    cuda = _on_cuda(values)
    sig, consts = {}, {}
    for name, param in zip(names, jit.params):
        v = values[name]
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[(names.index(name),)] = cuda.get(name, v)
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name] = "constexpr"
            consts[(names.index(name),)] = None
        else:
            sig[name] = "i64" if abs(int(v)) >= 2**31 else "i32"
    return sig, consts, {k: v for k, v in kwargs.items() if k in OPTIONS}


def _representative_calls() -> None:
    """Small calls that reach every kernel and its branches (FP8 caches, splits, quant)."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 64, generator=g).to(dt)
        w = torch.ones(64, dtype=dt)
        fused.rms_norm(x, w, 1e-5)
        fused.rms_norm(x, w, 1e-5, residual=x.clone())
        fused.silu_and_mul(torch.randn(3, 128, generator=g).to(dt))
        for fp8 in (False, True):
            _attention_calls(dt, fp8, g)
        for cfg in (skinny_config.SkinnyConfig(4, 64),
                    skinny_config.SkinnyConfig(16, 32, 2, use_dot=True)):
            fp8_gemm.bf16_gemm_small_m(torch.randn(2, 128, generator=g).to(dt),
                                       torch.randn(32, 128, generator=g).to(dt), config=cfg)
        for cfg in (skinny_config.SkinnyConfig(4, 64), skinny_config.SkinnyConfig(4, 64, 2)):
            h = fp8_gemm.bf16_gemm_small_m(torch.randn(1, 64, generator=g).to(dt),
                                           torch.randn(64, 64, generator=g).to(dt),
                                           config=cfg, silu_cols=32)  # SwiGLU folded in
            fp8_gemm.bf16_gemm_small_m(h, torch.randn(16, 32, generator=g).to(dt), config=cfg,
                                       glu=True)
    a = torch.randn(4, 256, generator=g)
    fp8_quant.per_token_quant_fp8(a, 1200.0)
    fp8_quant.per_token_quant_fp8(a, 1200.0, max_one_pass=64)
    fp8_quant.per_token_quant_fp8(a, 1200.0, chunk=64)
    fp8_quant.silu_and_mul_quant_fp8(a, 1200.0)
    fp8_quant.silu_and_mul_quant_fp8(a, 1200.0, chunk=32)
    fp8_quant.rms_norm_quant_fp8(a, torch.ones(256), 1e-5, residual=a.clone())
    xq, xs = fp8_quant.per_token_quant_fp8(torch.randn(2, 128, generator=g))
    wq, ws = fp8_quant.per_token_quant_fp8(torch.randn(32, 128, generator=g))
    for cfg in (skinny_config.SkinnyConfig(4, 64),
                skinny_config.SkinnyConfig(4, 64, 2, prefetch=True),
                skinny_config.SkinnyConfig(4, 32, 1, ahead=4),  # K 128: one group of four
                skinny_config.SkinnyConfig(16, 64, 2, use_dot=True)):
        fp8_gemm.fp8_gemm_small_m(xq, xs, wq, ws.view(-1), torch.bfloat16, config=cfg)
    int8_w8a8.per_token_quant_int8(a.bfloat16(), max_one_pass=64)
    int8_w8a8.per_token_quant_int8(a, chunk=64)
    fp8_quant.silu_and_mul_quant_fp8(a, int8=True)
    fp8_quant.rms_norm_quant_fp8(a, torch.ones(256), 1e-5, residual=a.clone(), int8=True)
    xq, xs = int8_w8a8.per_token_quant_int8(torch.randn(2, 128, generator=g))
    wq, ws = int8_w8a8.per_token_quant_int8(torch.randn(32, 128, generator=g))
    for cfg in (skinny_config.SkinnyConfig(4, 64),
                skinny_config.SkinnyConfig(16, 64, 2, use_dot=True)):
        int8_w8a8.int8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16, config=cfg)
    int8_w8a8.scale_int32(torch.ones(3, 5, dtype=torch.int32), torch.ones(3, 1),
                          torch.ones(5, 1), torch.bfloat16)


def _attention_calls(dt: torch.dtype, fp8: bool, g: torch.Generator) -> None:
    hq, hk, d, bs, nb = 4, 2, 64, 16, 8
    cache_dt = FP8_DTYPE if fp8 else dt
    kc = torch.randn(nb, bs, hk, d, generator=g).to(cache_dt)
    vc = torch.randn(nb, bs, hk, d, generator=g).to(cache_dt)
    scales = {"k_scale": torch.ones(hk), "v_scale": torch.ones(hk)} if fp8 else {}
    qkv = torch.randn(3, hq + 2 * hk, d, generator=g).to(dt)
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    rope = torch.randn(64, d, generator=g).to(dt)
    fused.rotary_and_cache(q, k, v, torch.arange(3), rope, kc, vc, torch.arange(3),
                           scales.get("k_scale"), scales.get("v_scale"))
    tables = torch.arange(nb, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([20, 37], dtype=torch.int32)
    new = rotary.NewTokens(k[:2], v[:2], torch.tensor([19, 36]), rope.float(),
                                    torch.tensor([5, -1]))
    for splits in (1, 3):
        paged_attention.paged_attention_decode(q[:2].contiguous(), kc, vc, tables, lens, 0.1,
                                               num_splits=splits, max_seq_len=64, **scales)
        paged_attention.paged_attention_decode(q[:2], kc, vc, tables, lens, 0.1, new=new,
                                               num_splits=splits, max_seq_len=64, **scales)
    qsl = torch.tensor([0, 1, 3], dtype=torch.int32)
    prefill_attention(q.contiguous(), kc, vc, qsl, torch.tensor([5, 9], dtype=torch.int32),
                      tables, 2, 0.1, **scales)
    o, lse = torch.randn(hq, 3, d, generator=g).to(dt), torch.randn(hq, 3, generator=g)
    merge_attention(o, lse, o, lse, torch.empty(3, hq, d, dtype=dt))
    gather_kv(kc, vc, tables[1], 3, 40, 48, scales.get("k_scale"), scales.get("v_scale"), dt)


def test_every_kernel_compiles_for_sm90(monkeypatch) -> None:
    launches = _record(monkeypatch)
    _representative_calls()
    specs, seen = [], set()
    for fn, args, kwargs in launches:
        sig, consts, opts = _spec(fn, args, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple(sorted(consts.items(), key=str)),
               tuple(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            specs.append((fn, sig, consts, opts))
    names = {fn.__name__ for fn, *_ in specs}
    assert {"_rotary_cache_kernel", "_decode_kernel", "_prefill_kernel", "_merge_kernel",
            "_gather_kv_kernel",
            "_per_token_quant_kernel", "_skinny_kernel", "_rms_norm_quant_kernel",
            "_scale_int32_kernel"} <= names
    late = {consts[(triton.JITFunction(fn).arg_names.index("RELEASE_LATE"),)]
            for fn, _, consts, _ in specs if fn.__name__ == "_skinny_kernel"}
    assert late == {True, False}  # both PDL release points are compiled and checked
    jobs = [{"module": fn.__module__, "name": fn.__name__, "sig": sig,
             "consts": [[list(k), v] for k, v in consts.items()], "opts": opts}
            for fn, sig, consts, opts in specs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok"] * len(jobs), proc.stdout[-3000:]


# Run in a fresh process: compile each job for sm_90, print "ok" or what failed.
COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for job in json.loads(sys.stdin.read()):
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    consts = {tuple(k): v for k, v in job["consts"]}
    try:
        c = triton.compile(ASTSource(kernel, job["sig"], constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=job["opts"])
        ptx = c.asm["ptx"]
        if "cubin" not in c.asm:
            print("no-cubin:" + job["name"])
        elif (job["name"] == "_skinny_kernel" and "griddepcontrol.wait" in ptx
              and not 0 <= ptx.find("ld.global") < ptx.find("griddepcontrol.wait")):
            print("weights-not-loaded-before-the-PDL-wait")  # kestrel.kernels.pdl's protocol
        elif (job["name"] == "_skinny_kernel" and "griddepcontrol.wait" in ptx
              and (ptx.find("griddepcontrol.launch_dependents") > ptx.find("griddepcontrol.wait"))
              != consts[(kernel.arg_names.index("RELEASE_LATE"),)]):
            print("dependents-released-at-the-wrong-point")  # at the start, or after the loop
        else:
            print("ok")
    except Exception as e:
        while e.__cause__ is not None:  # the innermost error says what failed
            e = e.__cause__
        print("FAILED", job["name"], consts, type(e).__name__, str(e)[-800:])
"""


def test_allreduce_norm_kernel_compiles_with_ll_words():
    """The fused TP all-reduce + RMSNorm runs only on several GPUs; here it at least compiles for
    sm_90, 16-bit and float32, and its peers' words are read with volatile loads in a spin
    loop, 8 bytes (payload and flag) at a time (kernels/allreduce_norm.py)."""
    for dt, pack in (("bf16", 2), ("fp32", 1)):
        sig = {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}",
               "res_out_ptr": f"*{dt}", "buf_ptrs": "*i64", "sig_ptrs": "*i64", "M": "i32",
               "H": "i32", "max_rows": "i32", "rank": "i32", "ll_offset": "i32",
               "slot_base": "i32", "eps": "fp32",
               "W": "constexpr", "BLOCK": "constexpr", "PACK": "constexpr", "PDL": "constexpr"}
        script = f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kestrel.kernels.allreduce_norm import _allreduce_rms_norm_kernel as k
sig = {sig!r}
consts = {{(k.arg_names.index("W"),): 2, (k.arg_names.index("BLOCK"),): 4096,
          (k.arg_names.index("PACK"),): {pack}, (k.arg_names.index("PDL"),): True}}
c = triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={{"num_warps": 16}})
print(c.asm["ptx"])
"""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ptx = proc.stdout
        assert "ld.volatile.global" in ptx and ".b64" in ptx
        assert "st.release" not in ptx and "ld.acquire" not in ptx  # no fences, no flags apart
