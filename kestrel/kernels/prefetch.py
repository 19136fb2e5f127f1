"""Start reading the next linear layer's weight into L2 while a decode step runs small kernels.

At decode a linear layer is a weight stream, but between two of them a step runs kernels that
read almost nothing from memory: norms, rotary + cache write, attention over a short context,
SwiGLU, and under tensor parallelism the all-reduces. Profiled on an H200 (llama-3-8b, batch
1) they take ~15 µs per layer at TP=1 and more at TP=2, with HBM idle. Once a GEMV has been
launched, the prefetcher launches, on a side stream, a kernel that asks L2 for the first bytes of
the *next* GEMV's weight (PTX ``prefetch.global.L2``, or Hopper's bulk prefetch); it runs
beside the small kernels, and the next GEMV finds those bytes in L2.

A prefetch is a hint: values are untouched, so outputs are bitwise the same with it on or off.
Only batches of up to ``max_tokens`` rows prefetch (beyond that the GEMMs are not weight
streams). ``KESTREL_L2_PREFETCH`` sets it: ``MB[,variant]`` (bytes fetched per weight; "0"
turns it off), variant one of ``VARIANTS``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import nn

# variant → (bytes per prefetch instruction, bulk?, PTX); the instruction's result is unused
VARIANTS = {
    "line": (128, False, "prefetch.global.L2 [$1]; mov.u32 $0, 0;"),
    "line_last": (128, False, "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;"),
    "bulk": (4096, True, "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;"),
}
DEFAULT_MB, DEFAULT_VARIANT = 0.0, "line"
_PER_PROGRAM = 256  # prefetch instructions per program


@triton.jit
def _prefetch_l2_kernel(base, CHUNK: tl.constexpr, BULK: tl.constexpr, ASM: tl.constexpr,
                        PER_PROGRAM: tl.constexpr):
    """Prefetch PER_PROGRAM chunks of CHUNK bytes each, from base + program's offset."""
    offs = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    addrs = base + offs
    if BULK:
        size = tl.full([PER_PROGRAM], CHUNK, tl.int32)
        tl.inline_asm_elementwise(ASM, "=r,l,r", [addrs, size],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(ASM, "=r,l", [addrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(weight: torch.Tensor, nbytes: int, variant: str = DEFAULT_VARIANT) -> None:
    """Ask L2 for (about) the first ``nbytes`` of ``weight`` (CUDA, contiguous) on the current
    stream; rounded down to whole programs, so small tensors may prefetch nothing."""
    chunk, bulk, asm = VARIANTS[variant]
    programs = min(nbytes, weight.numel() * weight.element_size()) // (chunk * _PER_PROGRAM)
    if programs > 0:
        _prefetch_l2_kernel[(programs,)](weight.view(torch.uint8).view(-1), CHUNK=chunk,
                                         BULK=bulk, ASM=asm, PER_PROGRAM=_PER_PROGRAM,
                                         num_warps=4)


class WeightPrefetcher:
    """Issues prefetches on a side stream that forks from the current stream at each call and
    joins it at ``join()`` (the end of a forward pass, as CUDA-graph capture requires)."""

    def __init__(self, device: torch.device, nbytes: int, variant: str = DEFAULT_VARIANT,
                 max_tokens: int = 64) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"L2 prefetch variant {variant!r}: expected one of {list(VARIANTS)}")
        self.nbytes, self.variant, self.max_tokens = nbytes, variant, max_tokens
        self.stream = torch.cuda.Stream(device)
        self.forked = False  # work on the side stream that the current stream has not joined

    def fetch(self, weight: torch.Tensor, tokens: int) -> None:
        if tokens > self.max_tokens:
            return
        main = torch.cuda.current_stream(weight.device)
        self.stream.wait_stream(main)  # after the GEMV just launched, beside what follows it
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, self.nbytes, self.variant)
        self.forked = True

    def join(self) -> None:
        if self.forked:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.forked = False


def from_env() -> tuple[float, str]:
    """(MB per weight, variant) from ``KESTREL_L2_PREFETCH``, else the defaults."""
    raw = os.environ.get("KESTREL_L2_PREFETCH", "")
    if not raw:
        return DEFAULT_MB, DEFAULT_VARIANT
    mb, _, variant = raw.partition(",")
    try:
        value = float(mb)
    except ValueError:
        raise ValueError(f"KESTREL_L2_PREFETCH={raw!r}: expected MB[,variant]") from None
    variant = variant or DEFAULT_VARIANT
    if value < 0 or variant not in VARIANTS:
        raise ValueError(f"KESTREL_L2_PREFETCH={raw!r}: MB must be >= 0, variant one of "
                         f"{list(VARIANTS)}")
    return value, variant


def streams_in_order(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, the weight it streams) for each linear layer of a Llama-family stage, in the
    order a forward pass runs them, the LM head last on the last stage."""
    order = []
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        order += [(m, m.weight) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                          mlp.down_proj)]
    if model.is_last:
        head = model.lm_head if model.lm_head is not None else model.embed_tokens
        order.append((head, head.weight))
    return order


def chain_prefetches(model: nn.Module, prefetcher: WeightPrefetcher | None) -> None:
    """Make each linear layer of ``model`` start the next one's prefetch once its own GEMM is
    launched (``LinearBase.prefetch_next``), and the model join the side stream at the end of
    its forward; None undoes it."""
    order = streams_in_order(model)
    for (m, _), (_, nxt) in zip(order, order[1:]):
        m.prefetch_next = None if prefetcher is None else functools.partial(prefetcher.fetch, nxt)
    model.prefetcher = prefetcher


def maybe_prefetcher(device: torch.device) -> WeightPrefetcher | None:
    """The prefetcher ``KESTREL_L2_PREFETCH`` asks for on this device (Hopper: the bulk
    variant needs sm_90), or None."""
    mb, variant = from_env()
    if mb <= 0 or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    return WeightPrefetcher(device, int(mb * 2**20), variant)

