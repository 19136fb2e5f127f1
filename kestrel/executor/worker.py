"""One rank of a TP × PP job: its stage of the model, and the loop a non-driver rank runs.

Every rank (the driver, rank 0, included) holds a ``StageRunner``: a ModelRunner for its
stage's layers and its TP shard, plus the point-to-point plumbing between stages. Per
micro-batch a rank builds the same ForwardBatch from the broadcast SchedulerOutput, receives
(hidden, residual) from the previous stage unless it is the first, runs its layers, and sends
to the next stage unless it is the last; the last stage turns hidden states into logits, and
its TP rank 0 sends them to the driver.

Between stages each TP rank sends only its 1/tp slice of the hidden dimension to its peer in
the next stage, which all-gathers the slices over its own (fast, intra-node) TP group: the slow
inter-node link carries each activation once, not tp times (Megatron's scatter/gather).
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import queue
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from kestrel.config import EngineConfig
from kestrel.core.scheduler import ScheduledRequest, SchedulerOutput
from kestrel.executor.model_runner import ForwardBatch, ModelRunner, PrevTokens, RunnerOutput
from kestrel.parallel.comm import (Groups, HealthCheck, all_reduce_min, init_groups, p2p_tag,
                                   receive_object, wait_work)
from kestrel.parallel.pipeline import ParallelLayout, stage_ranges

log = logging.getLogger(__name__)

CALIBRATION_SEQ = (1 << 20) - 1  # micro-batch number of the start-up calibration (p2p tags)


class StageRunner:
    """This rank's stage: the model shard, its KV cache, and the sends to the next stage."""

    def __init__(self, cfg: EngineConfig, groups: Groups) -> None:
        lay = groups.layout
        self.cfg = cfg
        self.groups = groups
        self.layout = lay
        self.layer_range = stage_ranges(cfg.model_config, lay.pp)[lay.pp_rank]
        self.runner = ModelRunner(cfg, groups.tp, self.layer_range)
        self.hidden_size = cfg.model_config.hidden_size
        self.vocab_size = cfg.model_config.vocab_size
        # scatter/gather between stages when the hidden size splits evenly over the TP ranks
        self.split = lay.tp if lay.tp > 1 and self.hidden_size % lay.tp == 0 else 1
        self._sends: list[tuple[Any, torch.Tensor]] = []  # in-flight isends and their buffers
        self.poll = self.runner.device.type == "cuda"  # gloo p2p work can only be waited on

    def calibrate_kv_scales(self) -> None:
        """FP8 caches: the runner's calibration prefill as one micro-batch through the stages
        (each stage calibrates its own layers on the hidden states it receives)."""
        self.runner.calibrate_kv_scales(lambda out: self.run(CALIBRATION_SEQ, out))
        self.drain_sends()

    def leave(self, clean: bool = True) -> None:
        """Release the graphs that captured collectives, then leave the process groups.
        ``clean``: every step finished (else a collective may wait on a dead peer: no wait)."""
        self.runner.release_graphs(wait=clean)
        self.groups.destroy()

    # ---- start-up -------------------------------------------------------------------------
    def local_num_blocks(self) -> int:
        """KV blocks this rank can hold (its stage's layers, its share of the KV heads)."""
        r = self.runner
        if self.cfg.cache.num_blocks is not None or r.device.type != "cuda":
            return r.num_blocks_that_fit()
        free, total = torch.cuda.mem_get_info(r.device)
        peak = r.profile_or_explain(self._profile_peak_bytes)
        budget = total * self.cfg.cache.gpu_memory_utilization - (total - free) - peak
        return max(0, int(budget // r.block_bytes()))

    def _profile_peak_bytes(self) -> int:
        """Activation memory of one forward at the full token budget (stage-aware: later stages
        start from zero hidden states instead of received ones)."""
        r, dev = self.runner, self.runner.device
        n = min(self.cfg.scheduler.max_num_batched_tokens,
                self.cfg.model_config.max_position_embeddings)
        nb = -(-n // r.block_size)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        r.allocate_kv_cache(nb)
        kv_bytes = torch.cuda.memory_allocated(dev) - before
        out = SchedulerOutput([ScheduledRequest("profile", [0] * n, 0, list(range(nb)), True)])
        with torch.inference_mode():
            batch = r.prepare(out)
            h = res = None
            if not self.layout.is_first_stage:
                h = torch.zeros(n, self.hidden_size, dtype=self.cfg.dtype, device=dev)
                res = torch.zeros_like(h)
            h, _ = r.model(batch.input_ids, batch.positions, r.kv_caches, batch.meta, h, res,
                           keep=batch.keep)
            if self.layout.is_last_stage:
                r.model.compute_logits(batch.logits_hidden(h))
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before - kv_bytes
        r.kv_caches = []
        torch.cuda.empty_cache()
        return int(peak)

    # ---- one micro-batch ------------------------------------------------------------------
    def run_whole(self, out: SchedulerOutput, prev: PrevTokens | None = None) -> RunnerOutput:
        """No pipeline stages: every TP rank runs the plain ModelRunner step (decode CUDA
        graphs included, their NCCL all-reduces captured in lockstep on every rank; with
        stages, ``run`` replays each stage's own graphs)."""
        return self.runner.execute(out, prev)

    def share_sampled(self, out: SchedulerOutput, tokens: torch.Tensor | None) -> PrevTokens:
        """Overlapped steps under TP: the driver's sampled tokens reach every rank on the device
        (a TP broadcast queued after the step), so each can fill the next step's placeholders.
        The driver passes its tokens; the other ranks pass None and receive."""
        ids = [s.request_id for s in out.scheduled if s.sample]
        if tokens is None:
            tokens = torch.empty(len(ids), dtype=torch.long, device=self.runner.device)
        self.groups.tp.broadcast_from_first(tokens)
        return PrevTokens({rid: i for i, rid in enumerate(ids)}, tokens)

    @torch.inference_mode()
    def run(self, seq: int, out: SchedulerOutput, health: HealthCheck | None = None
            ) -> tuple[ForwardBatch, torch.Tensor | None]:
        """Run this stage on micro-batch ``seq``; the last stage returns logits [N, V]."""
        self._reap_sends()
        r = self.runner
        batch = r.prepare(out)
        hidden = residual = None
        if not self.layout.is_first_stage:
            hidden, residual = self._recv_hidden(seq, int(batch.input_ids.numel()), health)
        if r.use_graph(batch):  # decode: this stage's layers (and head) as one graph replay
            result = r.graphs.run(batch.id_pos_slot, batch.meta, hidden, residual)
            if self.layout.is_last_stage:  # decode samples every row, in order; a copy, as
                return batch, result.clone()  # the send may still read it at the next replay
            hidden, residual = result
        else:
            hidden, residual = r.model(batch.input_ids, batch.positions, r.kv_caches,
                                       batch.meta, hidden, residual, keep=batch.keep)
        if not self.layout.is_last_stage:
            self._send_hidden(seq, hidden, residual)
            return batch, None
        if batch.logits_indices.numel() == 0:
            return batch, None
        return batch, r.model.compute_logits(batch.logits_hidden(hidden))  # [N, V] float32

    def _send_hidden(self, seq: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        both = torch.stack([hidden, residual])  # [2, T, H]
        if self.split > 1:
            both = both.chunk(self.split, dim=-1)[self.layout.tp_rank]  # [2, T, H / tp]
        both = both.contiguous()
        dst = self.layout.rank_of(self.layout.pp_rank + 1, self.layout.tp_rank)
        self._sends.append((dist.isend(both, dst, tag=p2p_tag(seq, 0)), both))

    def _recv_hidden(self, seq: int, num_tokens: int, health: HealthCheck | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        buf = torch.empty(2, num_tokens, self.hidden_size // self.split, dtype=self.cfg.dtype,
                          device=self.runner.device)
        src = lay.rank_of(lay.pp_rank - 1, lay.tp_rank)
        wait_work(dist.irecv(buf, src, tag=p2p_tag(seq, 0)),
                  f"hidden states of micro-batch {seq} from rank {src}", health, poll=self.poll)
        if self.split > 1:
            buf = self.groups.tp.all_gather_last_dim(buf)  # [2, T, H]
        return buf[0], buf[1]

    def send_logits(self, seq: int, logits: torch.Tensor) -> None:
        """Last stage, TP rank 0: hand the micro-batch's logits to the driver."""
        logits = logits.contiguous()
        self._sends.append((dist.isend(logits, 0, group=self.groups.logits,
                                       tag=p2p_tag(seq, 1)), logits))

    def _reap_sends(self) -> None:
        """Forget finished sends (NCCL); gloo sends complete once the peer has the data, which
        the peer's own progress proves, so keep only the last few there."""
        if self.poll:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        else:
            while len(self._sends) > 8:
                self._sends.pop(0)[0].wait()

    def drain_sends(self, timeout: float = 30.0) -> None:
        for work, _ in self._sends:
            wait_work(work, "a pending send", timeout=timeout, poll=self.poll)
        self._sends = []


def runner_output(batch: ForwardBatch, logits: torch.Tensor | None, vocab: int) -> RunnerOutput:
    """Split one micro-batch's logits rows into the engine's sampled and prompt-logprob parts."""
    if logits is None:
        logits = torch.empty(0, vocab, dtype=torch.float32)
    prompt = {rid: logits[a:b] for rid, (a, b) in batch.prompt_rows.items()}
    return RunnerOutput(logits[batch.sample_rows], prompt)


# ---- a non-driver rank ----------------------------------------------------------------------

def rank_device(cfg: EngineConfig, local_rank: int) -> EngineConfig:
    """One GPU per rank on its node; CPU ranks share the CPU."""
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        return cfg.replace(device=f"cuda:{local_rank}")
    return cfg


def start_rank(cfg: EngineConfig, layout: ParallelLayout, backend: str, init_method: str | None,
               local_rank: int, health: HealthCheck | None = None) -> StageRunner:
    """Join the job, load this rank's shard and agree with every rank on the KV block count."""
    cfg = rank_device(cfg, local_rank)
    one_shot = cfg.dtype if cfg.parallel.custom_all_reduce else None
    groups = init_groups(layout, backend, torch.device(cfg.device), init_method, one_shot)
    stage = StageRunner(cfg, groups)
    stage.calibrate_kv_scales()  # FP8 caches: every rank at once
    if layout.rank == 0:
        num_blocks = _agreed_blocks_driver(stage, groups, health)
    else:
        num_blocks = all_reduce_min(stage.local_num_blocks(), groups)
    stage.runner.allocate_kv_cache(num_blocks)
    if stage.runner.device.type == "cuda":
        if layout.tp > 1:  # create the NCCL communicator before graph capture needs it
            groups.tp.all_reduce(torch.zeros(1, device=stage.runner.device))
        stage.runner.capture_graphs()  # every rank captures the same sizes in the same order
    return stage


def _agreed_blocks_driver(stage: StageRunner, groups: Groups, health: HealthCheck | None) -> int:
    t = torch.tensor([stage.local_num_blocks()], dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.ctrl, async_op=True)
    wait_work(work, "every rank to load its shard", health)
    return int(t.item())


def run_worker(cfg: EngineConfig, layout: ParallelLayout, backend: str, init_method: str | None,
               local_rank: int) -> None:
    """Everything a non-driver rank does: start, then run micro-batches until told to stop."""
    stage = start_rank(cfg, layout, backend, init_method, local_rank)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    # A thread always waits on the control group, so the driver's broadcast of micro-batch k+1
    # completes while this rank still computes k: the pipeline keeps flowing.
    threading.Thread(target=_receive_loop, args=(stage.groups, inbox), daemon=True,
                     name="kestrel-ctrl").start()
    prev: PrevTokens | None = None  # the last step's shared tokens (overlapped steps)
    clean = False
    try:
        while True:
            msg = inbox.get()
            if isinstance(msg, BaseException):
                raise RuntimeError(f"rank {layout.rank} lost the driver (rank 0): {msg}") from msg
            if msg[0] == "stop":
                break
            _, seq, out, share = msg
            if layout.pp == 1:
                stage.run_whole(out, prev)
                prev = stage.share_sampled(out, None) if share else None
                continue
            _, logits = stage.run(seq, out)
            if logits is not None and layout.rank == layout.last_stage_leader != 0:
                stage.send_logits(seq, logits)
        stage.drain_sends()
        clean = True
    finally:
        stage.leave(clean)


def _receive_loop(groups: Groups, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            msg = receive_object(groups)
        except BaseException as e:  # noqa: BLE001 - handed to the main loop, which raises it
            inbox.put(e)
            return
        inbox.put(msg)
        if msg[0] == "stop":
            return


def spawned_worker_main(cfg: EngineConfig, layout: ParallelLayout, backend: str,
                        init_method: str, num_threads: int) -> None:
    """Entry point of a process spawned by MultiProcExecutor on this machine."""
    _die_with_parent()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a rank is stuck
    if not cfg.device.startswith("cuda"):
        torch.set_num_threads(num_threads)
    logging.basicConfig(level=os.environ.get("KESTREL_WORKER_LOG", "WARNING"),
                        format=f"%(levelname)s rank{layout.rank} %(name)s: %(message)s")
    run_worker(cfg, layout, backend, init_method, local_rank=layout.rank)


def _die_with_parent() -> None:
    """Linux: take this worker down with the driver even if the driver is SIGKILLed (no
    orphans holding GPU memory). Tied to the thread that spawned us: spawn from a long-lived
    thread."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
