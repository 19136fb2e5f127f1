"""Pipeline parallelism without tensors: where the stages split, and how micro-batches are sized.

Stages are contiguous runs of decoder layers. The embedding sits on the first stage and the LM
head (and final norm) on the last, so a plain ``layers / pp`` split overloads both ends; we
balance stage *cost* instead, counting the embedding and the head in units of decoder layers
(by parameter count: that is what a stage must hold, and what a memory-bound decode step reads).

Micro-batching: the engine keeps up to ``pp`` micro-batches in flight, each a disjoint set of
requests; ``micro_batch_seq_cap`` splits the requests that can run into that many roughly equal
micro-batches so that in steady state every stage has one to work on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kestrel.config import ModelConfig


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (attention + MLP + two norms)."""
    h = cfg.hidden_size
    attn = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    return attn + 3 * h * cfg.intermediate_size + 2 * h


def end_costs(cfg: ModelConfig) -> tuple[float, float]:
    """(first stage extra, last stage extra) in decoder-layer units: embedding; head + norm.

    With tied embeddings the last stage holds its own copy of the embedding as the head.
    """
    per_layer = layer_params(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    return embed / per_layer, (embed + cfg.hidden_size) / per_layer


def partition_layers(num_layers: int, pp: int, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Split ``num_layers`` into ``pp`` contiguous [start, end) ranges minimising the costliest
    stage, where a stage costs its layer count plus ``first_extra`` / ``last_extra`` at the
    ends. Every stage gets at least one layer. Ties go to the most even layer counts."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp}")
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {num_layers} decoder "
                         f"layers: every stage needs at least one layer")
    extra = [0.0] * pp
    extra[0] += first_extra
    extra[-1] += last_extra
    # best[s][n]: (max stage cost, sum of squared layer counts) of the first s stages over n layers
    inf = (math.inf, math.inf)
    best = [[inf] * (num_layers + 1) for _ in range(pp + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, pp + 1):
        for n in range(s, num_layers - (pp - s) + 1):
            for k in range(s - 1, n):  # the first s-1 stages take k layers, stage s takes n-k
                prev = best[s - 1][k]
                if prev[0] == math.inf:
                    continue
                cand = (max(prev[0], n - k + extra[s - 1]), prev[1] + (n - k) ** 2)
                if cand < best[s][n]:
                    best[s][n], cut[s][n] = cand, k
    bounds, n = [], num_layers
    for s in range(pp, 0, -1):
        k = cut[s][n]
        bounds.append((k, n))
        n = k
    return bounds[::-1]


def stage_ranges(cfg: ModelConfig, pp: int) -> list[tuple[int, int]]:
    """The balanced [start, end) decoder-layer range of every stage of this model."""
    first, last = end_costs(cfg)
    return partition_layers(cfg.num_hidden_layers, pp, first, last)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a pipeline that drains ``m`` micro-batches through ``p`` stages."""
    return (pp - 1) / (micro_batches + pp - 1)


def micro_batch_seq_cap(num_ready: int, free_slots: int) -> int | None:
    """How many requests the next micro-batch may take, so that the requests ready to run are
    shared evenly by the ``free_slots`` micro-batches the pipeline can still accept."""
    if free_slots <= 1:
        return None
    return max(1, math.ceil(num_ready / free_slots))


@dataclass(frozen=True)
class ParallelLayout:
    """Rank arithmetic of a TP × PP job: rank = pp_rank · tp + tp_rank; rank 0 drives."""

    tp: int
    pp: int
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def tp_ranks(self, pp_rank: int) -> list[int]:
        return [self.rank_of(pp_rank, t) for t in range(self.tp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def last_stage_leader(self) -> int:
        """The rank that returns logits to the driver (TP rank 0 of the last stage)."""
        return self.rank_of(self.pp - 1, 0)


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse, with the reason, a layout the model cannot be split into."""
    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(f"{cfg.num_attention_heads} attention heads are not divisible by "
                        f"tensor_parallel_size {tp}")
    kv = cfg.num_key_value_heads
    if (tp < kv and kv % tp) or (tp >= kv and tp % kv):
        problems.append(f"{kv} KV heads cannot be split over (or replicated on) {tp} ranks")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size {cfg.intermediate_size} is not divisible by "
                        f"tensor_parallel_size {tp}")
    if pp > cfg.num_hidden_layers:
        problems.append(f"pipeline_parallel_size {pp} exceeds the {cfg.num_hidden_layers} "
                        f"decoder layers")
    if problems:
        raise ValueError(f"cannot split the model over tensor_parallel_size={tp}, "
                         f"pipeline_parallel_size={pp}: " + "; ".join(problems))
