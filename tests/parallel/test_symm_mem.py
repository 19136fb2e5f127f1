"""The symmetric-memory one-shot all-reduce, and the fused all-reduce + RMSNorm on the same
buffers, against NCCL's sum, eager and inside a CUDA graph.

Two real processes, one GPU each (scripts/parallel_check.sh runs it on a 2-GPU machine).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kestrel.parallel.comm import free_port
from kestrel.parallel.symm_mem import MAX_BYTES, try_symm_mem_all_reduce

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]


def _rank(rank: int, port: int, dtype: torch.dtype, errors) -> None:
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2)
        group = dist.new_group([0, 1], backend="nccl")
        dev = torch.device("cuda", rank)
        ar = try_symm_mem_all_reduce(group, rank, 2, dev, dtype)
        assert ar is not None, "symmetric memory did not set up (see the warning)"
        gen = torch.Generator(device=dev).manual_seed(1234 + rank)
        for n in (2, 6, 4096, 64 * 4096, MAX_BYTES // dtype.itemsize):
            for _ in range(5):  # back to back: a rank must not overwrite a buffer still read
                x = torch.randn(n, generator=gen, device=dev).to(dtype)
                want = x.clone()
                dist.all_reduce(want, group=group)
                assert ar.fits(x)
                got = ar(x)
                assert torch.equal(got, want), f"{n} elements differ from NCCL"
        # captured once, replayed with new inputs: the graph reads the live buffers
        xs = [torch.zeros(3, 4096, dtype=dtype, device=dev) for _ in range(4)]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [ar(x) for x in xs]
        for _ in range(3):
            for x in xs:
                x.copy_(torch.randn(x.shape, generator=gen, device=dev))
            graph.replay()
            for x, out in zip(xs, outs):
                want = x.clone()
                dist.all_reduce(want, group=group)
                assert torch.equal(out, want), "graph replay differs from NCCL"
        _check_fused_norm(ar, group, gen, dev, dtype)
        dist.barrier(group=group)
        dist.destroy_process_group()
    except BaseException as e:  # reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def _check_fused_norm(ar, group, gen, dev, dtype) -> None:
    """The fused all-reduce + residual + RMSNorm kernel against NCCL's sum then the RMSNorm
    kernel: the same bits, eagerly (row counts back to back) and replayed in a CUDA graph."""
    from kestrel.kernels.fused import rms_norm

    assert ar.fused_norm, "the fused all-reduce + RMSNorm failed its start-up check"
    h = 4096
    w = torch.randn(h, generator=gen, device=dev).to(dtype)

    def want(x, res):
        s = x.clone()
        dist.all_reduce(s, group=group)
        return rms_norm(s, w, 1e-6, res)

    for rows in (1, 3, 17, ar._max_rows(h)):
        for _ in range(3):
            x = torch.randn(rows, h, generator=gen, device=dev).to(dtype)
            res = torch.randn(rows, h, generator=gen, device=dev).to(dtype)
            assert ar.fits_norm(x, res)
            got = ar.rms_norm(x, w, 1e-6, res)
            ref = want(x, res)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), rows
    xs = [torch.zeros(2, h, dtype=dtype, device=dev) for _ in range(3)]
    res = torch.zeros(2, h, dtype=dtype, device=dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [ar.rms_norm(x, w, 1e-6, res) for x in xs]
    for _ in range(3):
        for x in xs + [res]:
            x.copy_(torch.randn(x.shape, generator=gen, device=dev))
        graph.replay()
        for x, out in zip(xs, outs):
            ref = want(x, res)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), "graph replay"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_shot_all_reduce_equals_nccl(dtype):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, dtype, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not alive, f"a rank hung: {msgs}"
    assert all(p.exitcode == 0 for p in procs), msgs
