"""Pick the executor for a configuration: one process, or one process per parallel rank."""

from __future__ import annotations

from typing import Protocol

from kestrel.config import EngineConfig
from kestrel.core.scheduler import SchedulerOutput
from kestrel.executor.model_runner import ModelRunner, PrevTokens, RunnerOutput


class Executor(Protocol):
    num_blocks: int

    def execute(self, out: SchedulerOutput) -> RunnerOutput: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """The model runner in this process."""

    supports_overlap = True  # execute() takes the previous step's tokens on the device

    def __init__(self, cfg: EngineConfig) -> None:
        self.runner = ModelRunner(cfg)
        self.runner.calibrate_kv_scales()  # before the profile run, which attends as served
        self.num_blocks = self.runner.num_blocks_that_fit()
        self.runner.allocate_kv_cache(self.num_blocks)
        self.runner.capture_graphs()

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
