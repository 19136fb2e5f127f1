"""Pick the executor for a configuration: one process, or one process per parallel rank."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Protocol

from kestrel.config import EngineConfig
from kestrel.core.scheduler import SchedulerOutput
from kestrel.executor.model_runner import ModelRunner, PrevTokens, RunnerOutput

log = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int

    def execute(self, out: SchedulerOutput) -> RunnerOutput: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """The model runner in this process."""

    supports_overlap = True  # execute() takes the previous step's tokens on the device

    def __init__(self, cfg: EngineConfig) -> None:
        t = [time.perf_counter()]
        self.runner = ModelRunner(cfg)
        t.append(time.perf_counter())
        self.runner.calibrate_kv_scales()  # before the profile run, which attends as served
        # the profile run is the first forward: kernels compile here (Triton, FA4, quack)
        self.num_blocks = self.runner.num_blocks_that_fit()
        self.runner.allocate_kv_cache(self.num_blocks)
        t.append(time.perf_counter())
        self.runner.capture_graphs()
        t.append(time.perf_counter())
        # where start-up goes (seconds), for `bench` to report
        self.startup_phases = dict(zip(("model", "kv_sizing", "graphs"),
                                       (b - a for a, b in itertools.pairwise(t))))
        log.info("start-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in
                                           self.startup_phases.items()))

    def execute(self, out: SchedulerOutput, prev: PrevTokens | None = None,
                share_sampled: bool = False) -> RunnerOutput:
        return self.runner.execute(out, prev)

    def share_sampled(self, out: SchedulerOutput, tokens) -> None:
        """One process: the next step reads the tokens where they are."""

    def shutdown(self) -> None:
        self.runner.kv_caches = []


def make_executor(cfg: EngineConfig) -> Executor:
    if cfg.parallel.world_size == 1:
        return UniProcExecutor(cfg)
    from kestrel.executor.multiproc import MultiProcExecutor

    return MultiProcExecutor(cfg)
