"""The fused TP all-reduce + RMSNorm's LL words (kernels/allreduce_norm.py) on one process: rank 0
of two, its peer simulated by words written into rank 0's buffer as rank 1 would push them. The
cross-GPU part (NVLink stores, 8-byte atomicity, the spin meeting a live peer) needs two GPUs
(tests/parallel/test_symm_mem.py); this checks the encoding, the decoding in element order,
the rank-order sum, the two halves by call parity and the call counts, also under the CPU
interpreter (the conftest sets it without CUDA). The peer's words are in place before the
launch, so the spin ends at once."""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels.allreduce_norm import allreduce_rms_norm
from kestrel.layers.norm import rms_norm_ref

W, HIDDEN, MAX_ROWS, LL_OFFSET, PROGRAMS = 2, 256, 8, 16, 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5])
def test_rank0_sums_its_peers_words_and_pushes_its_own(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    words = HIDDEN * dtype.itemsize // 4
    size = LL_OFFSET + 2 * W * MAX_ROWS * words
    bufs = [torch.zeros(size, dtype=torch.int64, device=DEV) for _ in range(W)]
    pads = [torch.zeros(64, dtype=torch.int32, device=DEV) for _ in range(W)]
    buf_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEV)
    sig_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEV)
    weight = torch.randn(HIDDEN, generator=gen).to(dtype).to(DEV)

    def ll(x: torch.Tensor, call: int) -> torch.Tensor:  # as a rank pushes x's rows
        return (call << 32) | (x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF)

    for call in (1, 2, 3):  # both halves, and one reused
        x0, x1, res = (torch.randn(rows, HIDDEN, generator=gen).to(dtype).to(DEV)
                       for _ in range(3))
        half = LL_OFFSET + (call & 1) * W * MAX_ROWS * words
        peer_slot = half + MAX_ROWS * words  # rank 1's rows in rank 0's buffer
        bufs[0][peer_slot:peer_slot + rows * words] = ll(x1, call).flatten()
        out, res_out = allreduce_rms_norm(x0, res, weight, 1e-6, buf_ptrs, sig_ptrs, 0, W,
                                          LL_OFFSET, MAX_ROWS, 0, PROGRAMS)
        want_out, want_res = rms_norm_ref((x0.float() + x1.float()).to(dtype), weight, 1e-6,
                                          res)
        # float32: the residual exact, the norm to float32 reduction order; bf16 also one unit
        # in the last place (the interpreter truncates where the GPU rounds)
        exact = dtype == torch.float32 or DEV == "cuda"
        torch.testing.assert_close(res_out, want_res, rtol=0 if exact else 2e-2,
                                   atol=0 if exact else 2e-2)
        torch.testing.assert_close(out, want_out, **({} if exact else {"rtol": 2e-2,
                                                                      "atol": 2e-2}))
        assert torch.equal(bufs[1][half:half + rows * words], ll(x0, call).flatten())
        assert pads[0][:min(rows, PROGRAMS)].tolist() == [call] * min(rows, PROGRAMS)


def test_peer_words_decode_in_element_order():
    """With this rank's rows and the residual zero the sum is the peer's rows exactly: any
    mix-up of a word's two 16-bit halves, or of words, shows bit for bit."""
    gen = torch.Generator().manual_seed(9)
    dtype, rows = torch.bfloat16, 3
    words = HIDDEN // 2
    size = LL_OFFSET + 2 * W * MAX_ROWS * words
    bufs = [torch.zeros(size, dtype=torch.int64, device=DEV) for _ in range(W)]
    pads = [torch.zeros(64, dtype=torch.int32, device=DEV) for _ in range(W)]
    x1 = torch.randn(rows, HIDDEN, generator=gen).to(dtype).to(DEV)
    start = LL_OFFSET + W * MAX_ROWS * words + MAX_ROWS * words  # call 1: odd half, slot 1
    bufs[0][start:start + rows * words] = ((1 << 32) | (
        x1.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)).flatten()
    zeros = torch.zeros(rows, HIDDEN, dtype=dtype, device=DEV)
    _, res_out = allreduce_rms_norm(
        zeros, zeros, torch.ones(HIDDEN, dtype=dtype, device=DEV), 1e-6,
        torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEV),
        torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEV), 0, W, LL_OFFSET,
        MAX_ROWS, 0, PROGRAMS)
    assert torch.equal(res_out, x1)
