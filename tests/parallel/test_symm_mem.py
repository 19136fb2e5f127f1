"""The symmetric-memory one-shot all-reduce against NCCL's, eager and inside a CUDA graph.

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
        dist.barrier(group=group)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_shot_all_reduce_equals_nccl(dtype):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, dtype, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not alive, f"a rank hung: {msgs}"
    assert all(p.exitcode == 0 for p in procs), msgs
