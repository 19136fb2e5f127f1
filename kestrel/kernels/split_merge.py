"""Split-K merge inside the splitting kernel: the last program of a group to finish merges.

A kernel that cuts one output row's work into S programs (decode attention's flash-decoding
splits) usually writes S partials and launches a second kernel to merge them. At batch 1 that
launch costs more than the merge. Here every program stores its partial, then counts itself
arrived with an atomic on the group's counter; the program that arrives last (it sees S − 1)
merges all partials and resets the counter to 0, so the next launch, or a CUDA-graph replay,
finds it ready. Stores are ordered before the arrival by a bar.sync and the atomic's release;
the merger reads partials past L1 (``.cg``).

The counters live in a per-device buffer (``arrival_counters``): two launches that use it must
not overlap on a device, which holds for the engine (one compute stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_splits(o, lse, part_out_ptr, part_lse_ptr, arrivals_ptr, out_ptr, stride_oh,
                  group_row, head_row0, split, used, num_splits, offs_g, offs_d, g_mask,
                  out_mask, GROUP: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr,
                  HEAD_DIM: tl.constexpr):  # fmt: skip
    """Store this split's partial output and log-sum-exp; the last of the ``used`` splits of
    the (sequence, KV head) to arrive merges them all: out = Σ_s w_s·o_s / Σ_s w_s with
    w_s = 2^(lse_s − max). ``out_ptr``: the output row of the group's first query head."""
    rows = (head_row0 + offs_g) * num_splits + split  # [BLOCK_G]
    tl.store(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
    tl.store(part_lse_ptr + rows, lse, mask=g_mask)
    # bar.sync, then one thread's acq_rel atomic: the program's stores are visible before it
    # counts as arrived, and the last arriver's loads follow every arrival.
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + group_row, 1, sem="acq_rel")
    if arrived == used - 1:
        tl.store(arrivals_ptr + group_row, 0)  # ready for the next launch (graph replays too)
        # MERGE_S splits of the group's heads per load ([MERGE_G, MERGE_S, D]: at batch 1
        # every split's partial in one round trip), merged online as flash attention does.
        mg = tl.arange(0, MERGE_G)
        ms = tl.arange(0, MERGE_S)
        d_mask = offs_d < HEAD_DIM
        first = (head_row0 + mg) * num_splits  # [MERGE_G]
        m = tl.full([MERGE_G], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([MERGE_G], dtype=tl.float32)
        acc = tl.zeros([MERGE_G, offs_d.shape[0]], dtype=tl.float32)
        for s0 in range(0, used, MERGE_S):
            srow = first[:, None] + s0 + ms[None, :]  # [MERGE_G, MERGE_S]
            s_mask = (s0 + ms < used)[None, :]
            # padded heads read lse 0 (finite weights over zero partials, never stored)
            lses = tl.load(part_lse_ptr + srow, mask=(mg < GROUP)[:, None] & s_mask,
                           other=float("-inf"), cache_modifier=".cg")
            lses = tl.where((mg < GROUP)[:, None], lses, 0.0)
            parts = tl.load(part_out_ptr + srow[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                            mask=(mg < GROUP)[:, None, None] & s_mask[:, :, None]
                            & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lses, axis=1))
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lses - m_new[:, None])  # [MERGE_G, MERGE_S]
            denom = denom * alpha + tl.sum(w, axis=1)
            acc = acc * alpha[:, None] + tl.sum(parts * w[:, :, None], axis=1)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + mg[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=(mg < GROUP)[:, None] & d_mask[None, :])


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-device int32 counters, zero between launches (each launch's merging programs reset
    theirs). Grown outside graph capture only; older buffers stay alive, as captured graphs
    hold their addresses. Launches on one device must not overlap (one stream, as the engine)."""
    bufs = _ARRIVALS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split merge: run the batch size once before "
                               "capturing it in a CUDA graph")
        bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]
