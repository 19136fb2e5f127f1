"""Process groups for a TP × PP job, and the few transfers the executor needs on top of them.

Groups (every rank creates every group, in the same order, as torch.distributed requires):
- the world group, on the device backend (NCCL on CUDA, gloo on CPU): point-to-point hidden
  states between stages and logits back to the driver, with the step timeout;
- one tensor-parallel group per stage, same backend: the layers' all-reduces and all-gathers;
- a gloo "control" group over all ranks with a long timeout: the driver broadcasts each
  SchedulerOutput on it as pickled bytes (even when tensors go over NCCL). Workers sit idle on
  it between requests, so its timeout only has to outlive the longest quiet spell.

Every wait the driver does is a poll with a deadline that also asks "is every rank still
alive?", so a dead or hung rank becomes a RuntimeError naming it instead of a silent hang.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kestrel.parallel.pipeline import ParallelLayout
from kestrel.parallel.state import SINGLE, TPGroup

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=7)  # control group: workers wait on it while the server is idle


def step_timeout() -> float:
    """Seconds any rank may take for one step before the job is declared hung."""
    return float(os.environ.get("KESTREL_DIST_TIMEOUT", "600"))


def torchrun_env() -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK when launched by torchrun (or its rendezvous env)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_backend(device: str, requested: str | None) -> str:
    return requested or ("nccl" if device.startswith("cuda") else "gloo")


@dataclass
class Groups:
    """This rank's view of the job: its place, its TP group, and the shared groups."""

    layout: ParallelLayout
    tp: TPGroup
    ctrl: Any  # gloo ProcessGroup over all ranks
    device: torch.device  # where this rank's tensors live
    # PP: the driver and the last stage's TP rank 0, on the world's backend, for the logits
    # alone. NCCL runs a group's point-to-point ops in order on one stream, so on the world
    # group the hidden states of micro-batch k+1 would queue behind the logits of k. None: PP=1.
    logits: Any = None

    def destroy(self) -> None:
        leave_process_groups()


def leave_process_groups() -> None:
    """Tear this rank's groups down without waiting on its peers (call once all work is done).

    Destroying several NCCL communicators can deadlock between ranks (pytorch/pytorch#119797):
    seen on 2×H100/H200, every rank stuck in destroy_process_group after the job's last step.
    An abort is local and immediate; gloo-only jobs (CPU) destroy as usual.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
            return
        except Exception as e:  # noqa: BLE001 - an older torch: fall back to destroy
            log.warning("NCCL abort at shutdown failed (%s); destroying instead", e)
    dist.destroy_process_group()


def init_groups(layout: ParallelLayout, backend: str, device: torch.device,
                init_method: str | None = None, one_shot_dtype: torch.dtype | None = None
                ) -> Groups:
    """Join the world (env:// under torchrun, or ``init_method``) and build every group.

    ``one_shot_dtype``: give each CUDA TP group a symmetric-memory one-shot all-reduce for
    small tensors of this dtype (``symm_mem.py``); None keeps every all-reduce on NCCL.
    """
    timeout = timedelta(seconds=step_timeout())
    dist.init_process_group(backend, init_method=init_method or "env://", rank=layout.rank,
                            world_size=layout.world_size, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    tp = SINGLE
    if layout.tp > 1:
        for s in range(layout.pp):
            ranks = layout.tp_ranks(s)
            group = dist.new_group(ranks, backend=backend, timeout=timeout)
            if s == layout.pp_rank:
                tp = TPGroup(layout.tp_rank, layout.tp, group)
        if one_shot_dtype is not None and device.type == "cuda":
            from kestrel.parallel.symm_mem import try_symm_mem_all_reduce

            one_shot = try_symm_mem_all_reduce(tp.group, tp.rank, tp.size, device, one_shot_dtype)
            tp = TPGroup(tp.rank, tp.size, tp.group, one_shot)
    logits = None
    if layout.pp > 1:  # every rank takes part in creating a group, members or not
        logits = dist.new_group([0, layout.last_stage_leader], backend=backend, timeout=timeout)
    return Groups(layout, tp, ctrl, device, logits)


# ---- waiting with a deadline --------------------------------------------------------------

HealthCheck = Callable[[], None]  # raises RuntimeError when a rank is known dead


def wait_work(work: Any, what: str, health: HealthCheck | None = None,
              timeout: float | None = None, poll: bool = True) -> None:
    """Wait for an async torch.distributed op, checking rank health, failing after ``timeout``.

    ``poll`` (collectives, NCCL): spin briefly (a decode step is milliseconds), then nap in
    growing slices of at most 0.1 ms, asking ``health`` each time (a pipeline stage waits
    here for every micro-batch's hidden states, the driver for its logits: naps of up to 1 ms
    overshot by up to 1 ms, 10-20% of a 5-10 ms decode micro-batch). gloo point-to-point work
    never reports completion before ``wait()``, so there ``poll=False`` blocks in ``wait()``,
    which gloo bounds by the group's timeout and fails at once with "Connection closed by peer"
    if a rank dies.
    """
    if not poll:
        try:
            work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"failed waiting for {what}: {e}") from e
        return
    limit = step_timeout() if timeout is None else timeout
    start = time.monotonic()
    nap, spins = 0.0, 0
    while not work.is_completed():
        if health is not None:
            health()
        elapsed = time.monotonic() - start
        if elapsed > limit:
            raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}: a rank is "
                               f"hung or unreachable (KESTREL_DIST_TIMEOUT sets the limit)")
        spins += 1
        if spins > 200:
            nap = min(1e-4, max(nap * 2, 2e-5))
            time.sleep(nap)
    work.wait()  # completes at once; surfaces an error the op ended with


# ---- pickled objects over the control group -------------------------------------------------

def broadcast_object(obj: Any, groups: Groups, health: HealthCheck | None = None) -> None:
    """Driver side: send ``obj`` to every rank (length header, then the bytes)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                               dtype=torch.uint8)
    header = torch.tensor([payload.numel()], dtype=torch.int64)
    for t, what in ((header, "the step header"), (payload, "the step broadcast")):
        work = dist.broadcast(t, src=0, group=groups.ctrl, async_op=True)
        wait_work(work, f"{what} to every rank", health)


def receive_object(groups: Groups) -> Any:
    """Worker side: the next object the driver broadcasts (blocks while the job is idle)."""
    header = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(header, src=0, group=groups.ctrl)
    payload = torch.empty(int(header.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=groups.ctrl)
    return pickle.loads(payload.numpy().tobytes())


def all_reduce_min(value: int, groups: Groups) -> int:
    """The smallest ``value`` over all ranks (e.g. KV blocks that fit on every stage)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.ctrl)
    return int(t.item())


def p2p_tag(seq: int, kind: int) -> int:
    """Tag of a point-to-point message: the micro-batch number and the kind (0 hidden, 1 logits).

    gloo matches on it; NCCL ignores tags and matches in issue order, which is the same order.
    """
    return (seq % (1 << 20)) * 2 + kind
