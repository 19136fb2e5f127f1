"""Stage partitioning, layout checks and micro-batch arithmetic: pure functions, no processes."""

from __future__ import annotations

import itertools

import pytest

from kestrel.loader.dummy import preset_config
from kestrel.parallel.pipeline import (
    ParallelLayout,
    bubble_fraction,
    check_layout,
    end_costs,
    micro_batch_seq_cap,
    partition_layers,
    stage_ranges,
)


def _cost(bounds, first, last):
    costs = [b - a for a, b in bounds]
    costs[0] += first
    costs[-1] += last
    return max(costs)


def _brute_force(n, pp, first, last):
    best = None
    for cuts in itertools.combinations(range(1, n), pp - 1):
        edges = (0, *cuts, n)
        bounds = list(itertools.pairwise(edges))
        c = _cost(bounds, first, last)
        best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("n,pp,first,last", [(2, 2, 0.4, 0.4), (7, 3, 0.0, 0.0),
                                             (10, 4, 2.4, 2.4), (9, 2, 5.0, 0.0),
                                             (12, 5, 0.7, 3.1), (30, 4, 8.0, 8.0)])
def test_partition_is_contiguous_and_optimal(n, pp, first, last):
    bounds = partition_layers(n, pp, first, last)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a < b for a, b in bounds)  # every stage holds a layer
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))  # contiguous
    assert _cost(bounds, first, last) == pytest.approx(_brute_force(n, pp, first, last))


def test_embedding_and_head_count():
    """llama-3-8b: the embedding and head weigh ~2.4 layers each, so the ends get fewer layers
    than the middle at PP=4, and the 405B splits 63/63 at PP=2."""
    cfg = preset_config("llama-3-8b")
    first, last = end_costs(cfg)
    assert 2.3 < first < 2.5 and 2.3 < last < 2.5
    sizes = [b - a for a, b in stage_ranges(cfg, 4)]
    assert sizes[0] < sizes[1] and sizes[-1] < sizes[-2] and sum(sizes) == 32
    assert stage_ranges(preset_config("llama-3.1-405b"), 2) == [(0, 63), (63, 126)]


def test_too_many_stages_refused():
    with pytest.raises(ValueError, match="exceeds the model's 2 decoder layers"):
        partition_layers(2, 3)


def test_check_layout_messages():
    smol = preset_config("smollm2-135m")  # 9 heads, 3 KV heads
    with pytest.raises(ValueError, match="9 attention heads are not divisible by "
                                         "tensor_parallel_size 2"):
        check_layout(smol, 2, 1)
    check_layout(smol, 3, 2)
    with pytest.raises(ValueError, match="exceeds the 2 decoder layers"):
        check_layout(preset_config("tiny-llama"), 1, 3)
    check_layout(preset_config("llama-3-8b"), 16, 2)  # 8 KV heads replicated on 16 ranks
    with pytest.raises(ValueError, match="KV heads"):
        check_layout(preset_config("tiny-llama").__class__(
            **{**preset_config("tiny-llama").__dict__, "num_attention_heads": 12,
               "num_key_value_heads": 3}), 4, 1)


def test_layout_arithmetic():
    lay = ParallelLayout(tp=2, pp=3, rank=5)
    assert (lay.tp_rank, lay.pp_rank, lay.world_size) == (1, 2, 6)
    assert lay.is_last_stage and not lay.is_first_stage
    assert lay.tp_ranks(1) == [2, 3] and lay.last_stage_leader == 4


def test_bubble_and_micro_batch_cap():
    assert bubble_fraction(1, 1) == 0
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert micro_batch_seq_cap(30, 2) == 15 and micro_batch_seq_cap(15, 1) is None
    assert micro_batch_seq_cap(1, 2) == 1 and micro_batch_seq_cap(0, 3) == 1
