"""Tensor × pipeline parallel executor: one process per rank, rank 0 drives from the engine.

Two ways in:
- ``kestrel serve -tp T -pp P`` on one machine: rank 0 is this process; ranks 1 .. T·P-1 are
  spawned here (torch.multiprocessing, spawn) and rendezvous over a free local port.
- torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT /
  LOCAL_RANK) across machines: every rank runs the same command; rank 0 goes on to serve, the
  others enter the worker loop here and exit when the driver stops them.

Per micro-batch the driver broadcasts the SchedulerOutput, runs stage 0 itself, and (with
pipeline stages) posts a receive for the logits the last stage will send. ``submit`` returns
once stage 0 is done, so the engine can schedule the next micro-batch while later stages work;
``collect`` waits for the oldest one. ``execute`` is both, for the non-pipelined engine step.

Failure is loud: every wait polls the worker processes and has a deadline
(KESTREL_DIST_TIMEOUT, default 600 s); a watchdog thread notices a dead worker even while the
engine is idle. Either way the remaining workers are stopped and ``dead_error`` is set, and
every later call raises it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kestrel.config import EngineConfig
from kestrel.core.scheduler import SchedulerOutput
from kestrel.executor.model_runner import ForwardBatch, PrevTokens, RunnerOutput
from kestrel.executor.worker import (StageRunner, run_worker, runner_output,
                                     spawned_worker_main, start_rank)
from kestrel.parallel.comm import (broadcast_object, device_backend, free_port,
                                   leave_process_groups, p2p_tag,
                                   torchrun_env, wait_work)
from kestrel.parallel.pipeline import ParallelLayout, check_layout, stage_ranges

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A submitted micro-batch whose logits have not been collected yet."""

    seq: int
    batch: ForwardBatch | None
    logits: torch.Tensor | None  # ready (last stage is the driver) or the receive buffer
    work: Any = None  # the pending irecv, when the logits come from another rank
    result: RunnerOutput | None = None  # no pipeline stages: the driver's own runner output


class MultiProcExecutor:
    """The Executor protocol over T·P ranks (see the module docstring)."""

    def __init__(self, cfg: EngineConfig) -> None:
        par = cfg.parallel
        check_layout(cfg.model_config, par.tensor_parallel_size, par.pipeline_parallel_size)
        if dist.is_initialized():  # torch.distributed holds one default group per process
            raise RuntimeError("this process already belongs to a torch.distributed job "
                               "(another parallel engine?): shut that one down first")
        self.cfg = cfg
        self.vocab_size = cfg.model_config.vocab_size
        self.procs: list[Any] = []  # spawned workers; empty under torchrun
        self.dead_error: RuntimeError | None = None
        self._closed = False
        self._seq = 0
        self._in_flight: deque[_InFlight] = deque()
        backend = device_backend(cfg.device, par.distributed_backend)
        env = torchrun_env()
        if env is not None:
            layout, init_method, local_rank = self._join_torchrun(cfg, env, backend)
        else:
            layout = ParallelLayout(par.tensor_parallel_size, par.pipeline_parallel_size, 0)
            init_method, local_rank = f"tcp://127.0.0.1:{free_port()}", 0
            self._spawn(cfg, layout, backend, init_method)
        self.layout = layout
        try:
            self.stage: StageRunner = start_rank(cfg, layout, backend, init_method, local_rank,
                                                 self._check_workers)
        except BaseException as e:  # noqa: BLE001 - stop the spawned workers, then re-raise
            self._abort_start(e)
        self.num_blocks = self.stage.runner.num_blocks
        # The driver lands pipelined micro-batches (logits, sampling) on a CUDA stream of its
        # own: on the compute stream, sampling micro-batch k would queue behind the stage-0 work
        # of k+1 and k+2 that the driver already launched there, so reading the tokens would
        # wait for those too and the driver could not schedule the next micro-batch until
        # stage 0 ran dry: the very idle time the extra micro-batch is for.
        device = self.stage.runner.device
        self._land_stream = (torch.cuda.Stream(device) if device.type == "cuda"
                             and layout.pp > 1 else None)
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name="kestrel-watchdog")
        self._watchdog.start()
        atexit.register(self.shutdown)
        log.info("parallel executor ready: tp=%d pp=%d (%s), stages %s, %d KV blocks",
                 layout.tp, layout.pp, backend, self._stage_summary(), self.num_blocks)

    # ---- start-up -------------------------------------------------------------------------
    @staticmethod
    def _join_torchrun(cfg: EngineConfig, env: dict[str, int], backend: str
                       ) -> tuple[ParallelLayout, str | None, int]:
        par = cfg.parallel
        layout = ParallelLayout(par.tensor_parallel_size, par.pipeline_parallel_size,
                                env["rank"])
        if env["world_size"] != layout.world_size:
            raise ValueError(f"WORLD_SIZE is {env['world_size']} but tensor_parallel_size × "
                             f"pipeline_parallel_size is {layout.world_size}: start one process "
                             f"per rank (torchrun --nnodes N --nproc-per-node G with N·G = "
                             f"{layout.world_size})")
        if layout.rank != 0:
            run_worker(cfg, layout, backend, None, env["local_rank"])
            raise SystemExit(0)  # this process was only ever a worker: never start a server
        return layout, None, env["local_rank"]

    def _spawn(self, cfg: EngineConfig, layout: ParallelLayout, backend: str,
               init_method: str) -> None:
        ctx = mp.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // layout.world_size)
        for rank in range(1, layout.world_size):
            lay = ParallelLayout(layout.tp, layout.pp, rank)
            p = ctx.Process(target=spawned_worker_main, name=f"kestrel-rank{rank}", daemon=True,
                            args=(cfg, lay, backend, init_method, threads))
            p.start()
            self.procs.append(p)

    def _stage_summary(self) -> str:
        return ", ".join(f"{a}-{b - 1}" for a, b in stage_ranges(self.cfg.model_config,
                                                                  self.layout.pp))

    # ---- health ---------------------------------------------------------------------------
    def _check_workers(self) -> None:
        """Raise the job's error if it is known dead, or if a spawned worker has exited."""
        if self.dead_error is not None:
            raise self.dead_error
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                code = p.exitcode
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise RuntimeError(f"parallel worker rank {rank} (pid {p.pid}) {how}; the "
                                   f"tp={self.cfg.parallel.tensor_parallel_size} × "
                                   f"pp={self.cfg.parallel.pipeline_parallel_size} job is down")

    def _watch(self) -> None:
        """Notice a dead worker while the engine is idle, and take the rest of the job down."""
        while not self._closed and self.dead_error is None:
            try:
                self._check_workers()
            except RuntimeError as e:
                if not self._closed:
                    log.error("%s", e)
                    self.dead_error = e
                    self._kill_workers()
                return
            time.sleep(0.2)

    def _fail(self, cause: BaseException, what: str) -> None:
        """Turn any failure into the job's one RuntimeError, stop the workers, and raise it."""
        if self.dead_error is None:
            try:
                self._check_workers()  # a dead worker explains the failure best
                err = RuntimeError(f"parallel executor failed during {what}: {cause}")
            except RuntimeError as dead:
                err = dead
            self.dead_error = err
        self._kill_workers()
        raise self.dead_error from cause

    def _abort_start(self, cause: BaseException) -> None:
        try:
            if isinstance(cause, (ValueError, KeyboardInterrupt)):
                raise cause  # bad input (checkpoint, sizes) keeps its own clear message
            self._fail(cause, "start-up")
        finally:
            self._closed = True
            self._kill_workers()
            leave_process_groups()

    @property
    def healthy(self) -> bool:
        return self.dead_error is None and not self._closed

    # ---- steps ----------------------------------------------------------------------------
    @property
    def supports_overlap(self) -> bool:
        """Overlapped steps need every rank to see the sampled tokens: TP only, no stages."""
        return self.layout.pp == 1

    def submit(self, out: SchedulerOutput, prev: PrevTokens | None = None,
               share_sampled: bool = False) -> None:
        """Start one micro-batch: broadcast it, run stage 0 here, await its logits later.
        ``share_sampled``: the engine will hand this step's tokens to ``share_sampled``."""
        self._check_workers()
        self._seq += 1
        seq = self._seq
        try:
            broadcast_object(("step", seq, out, share_sampled), self.stage.groups,
                             self._check_workers)
            if self.layout.pp == 1:
                self._in_flight.append(_InFlight(seq, None, None,
                                                 result=self.stage.run_whole(out, prev)))
                return
            batch, logits = self.stage.run(seq, out, self._check_workers)
            item = _InFlight(seq, batch, logits)
            n = int(batch.logits_indices.numel())
            if n:  # the last stage (another rank) sends these rows back
                item.logits = torch.empty(n, self.vocab_size, dtype=torch.float32,
                                          device=self.stage.runner.device)
                item.work = dist.irecv(item.logits, self.layout.last_stage_leader,
                                       group=self.stage.groups.logits, tag=p2p_tag(seq, 1))
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            self._fail(e, f"micro-batch {seq}")
        self._in_flight.append(item)

    def collect(self) -> RunnerOutput:
        """The oldest submitted micro-batch's logits (waits for the last stage). Called inside
        ``landing()``, the logits are ready on the landing stream."""
        item = self._in_flight.popleft()
        if item.result is not None:
            return item.result
        if item.work is not None:
            try:
                wait_work(item.work, f"logits of micro-batch {item.seq} from rank "
                          f"{self.layout.last_stage_leader}", self._check_workers,
                          poll=self.stage.poll)  # ends with work.wait(): the current stream
            except Exception as e:  # noqa: BLE001
                self._fail(e, f"micro-batch {item.seq}")
            if self._land_stream is not None:  # allocated on the compute stream, read here
                item.logits.record_stream(self._land_stream)
        return runner_output(item.batch, item.logits, self.vocab_size)

    def landing(self) -> contextlib.AbstractContextManager:
        """Where the engine collects a micro-batch and samples from it: the landing stream
        (CUDA pipelines; see ``__init__``), else the current one."""
        if self._land_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._land_stream)

    def execute(self, out: SchedulerOutput, prev: PrevTokens | None = None,
                share_sampled: bool = False) -> RunnerOutput:
        self.submit(out, prev, share_sampled)
        return self.collect()

    def share_sampled(self, out: SchedulerOutput, tokens: torch.Tensor) -> None:
        try:
            self.stage.share_sampled(out, tokens)
        except Exception as e:  # noqa: BLE001
            self._fail(e, "sharing sampled tokens")

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # ---- teardown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every rank and wait for the processes; leaves no orphans. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.dead_error is None:
            clean = False
            try:
                while self._in_flight:
                    self.collect()
                broadcast_object(("stop",), self.stage.groups, self._check_workers)
                self.stage.drain_sends()
                clean = True
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                log.warning("parallel executor: unclean stop (%s)", e)
            self.stage.leave(clean)  # as the workers do on "stop": nobody waits on a peer
        self._join_workers(timeout=10.0)
        if getattr(self, "stage", None) is not None:
            self.stage.runner.release_graphs(wait=False)
            self.stage.runner.kv_caches = []
        leave_process_groups()

    def _join_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()

    def _kill_workers(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
