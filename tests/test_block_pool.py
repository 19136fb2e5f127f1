"""Block pool and KV manager: reference counts, prefix hits, eviction, and no leaks ever."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel import LLM, SamplingParams
from kestrel.core.block_pool import BlockPool, KVCacheManager
from kestrel.request import Request


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), max_tokens=4)


def test_prefix_blocks_shared_and_evicted_lru():
    pool = BlockPool(num_blocks=8, block_size=4)
    kv = KVCacheManager(pool)
    a = _req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10)
    assert len(a.block_ids) == 3 and pool.num_free == 5
    b = _req("b", list(range(8)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert hits == a.block_ids[:2]  # both full blocks of the shared prefix
    b.num_computed_tokens = 0
    assert kv.allocate_slots(b, 3, hits)
    assert [pool.blocks[i].ref_cnt for i in hits] == [2, 2]
    kv.free(a)
    kv.free(b)
    pool.check_invariants(expect_idle=True)
    assert pool.num_free == 8 and len(pool.cached) == 2  # still findable while free
    pool.allocate(8)  # reuse evicts everything
    assert not pool.cached


def test_lookup_hashes_up_to_the_first_miss(monkeypatch):
    """Admitting a long prompt hashes its blocks only as far as the cache hits (in doubling
    batches), and a chunk's blocks when they are registered (the flush after its allocation:
    the next schedule, once the step has launched), not all at once; a long cached prefix is
    still found whole, across batches."""
    from kestrel.core import block_pool

    calls = []
    real = block_pool.hash_block
    monkeypatch.setattr(block_pool, "hash_block", lambda p, t: calls.append(1) or real(p, t))
    pool = BlockPool(num_blocks=1200, block_size=4)
    kv = KVCacheManager(pool)
    a = _req("a", list(range(4000)))  # 1,000 full blocks
    assert kv.get_computed_blocks(a) == [] and len(calls) == 16
    assert kv.allocate_slots(a, 400) and len(calls) == 16 and not pool.cached
    kv.flush()
    assert len(calls) == 100 and len(pool.cached) == 100  # the first chunk's blocks
    a.num_computed_tokens = 400
    assert kv.allocate_slots(a, 3600)
    kv.flush()
    assert len(calls) == 1000
    b = _req("b", list(range(3000)) + [7] * 40)  # 760 full blocks, 750 of them shared
    del calls[:]
    hits = kv.get_computed_blocks(b)  # batches of 16, 32, ..., 256, then 263 (to block 759)
    assert hits == a.block_ids[:750] and len(calls) == 759
    c = _req("c", list(range(4000)) + [1])
    assert kv.get_computed_blocks(c) == a.block_ids  # all 1,000: the last batch cut to fit


def test_registration_deferred_but_found_in_the_same_step():
    """Blocks enter the prefix cache at the next flush, yet a request admitted later in the
    same schedule finds them (the lookup flushes first), and a request freed before a flush
    leaves its blocks findable."""
    from kestrel.config import SchedulerConfig
    from kestrel.core.scheduler import Scheduler

    pool = BlockPool(num_blocks=16, block_size=4)
    kv = KVCacheManager(pool)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), kv)
    s.add(_req("a", list(range(10))))
    s.add(_req("b", list(range(10))))
    out = s.schedule()
    assert [r.num_new_tokens for r in out.scheduled] == [10, 2]  # b: a's two full blocks
    c = _req("c", list(range(20, 32)))
    assert kv.allocate_slots(c, 12) and len(pool.cached) == 2  # c's three: not yet
    kv.free(c)
    assert len(pool.cached) == 5
    d = _req("d", list(range(20, 32)) + [5])
    assert len(kv.get_computed_blocks(d)) == 3


def test_allocation_fails_cleanly_when_short():
    pool = BlockPool(num_blocks=2, block_size=4)
    kv = KVCacheManager(pool)
    r = _req("r", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert r.block_ids == [] and pool.num_free == 2
    with pytest.raises(RuntimeError):
        pool.free([0])  # never allocated: double free is detected


@pytest.fixture(scope="module")
def tiny_engine():
    # 12 blocks of 4 tokens: a handful of requests already forces preemption.
    return LLM("tiny-llama", load_format="dummy", block_size=4, num_kv_blocks=12,
               max_model_len=48, max_num_batched_tokens=16, debug_checks=True).engine


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("step"), st.integers(1, 4)),
), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_no_leak_under_random_interleavings(tiny_engine, ops):
    eng = tiny_engine
    finished: dict[str, int] = {}
    added: list[str] = []
    aborted: set[str] = set()
    for op in ops:
        if op[0] == "add":
            _, plen, max_tokens, prefix = op
            rid = f"r{len(added)}-{id(ops)}"
            prompt = [7] * (prefix * 4) + list(range(1, plen + 1))  # shared prefixes
            eng.add_request(rid, prompt[:47], SamplingParams(max_tokens=max_tokens,
                                                            temperature=0.8, seed=len(added)))
            added.append(rid)
        elif op[0] == "abort" and added:
            rid = added[op[1] % len(added)]
            if rid not in finished:
                aborted.add(rid)
            eng.abort_request(rid)
        else:
            for _ in range(op[1]):
                for out in eng.step():
                    if out.finished:
                        finished[out.request_id] = finished.get(out.request_id, 0) + 1
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = finished.get(out.request_id, 0) + 1
    assert all(v == 1 for v in finished.values())  # no request finishes twice
    assert set(added) - aborted == set(finished)  # and none is lost
    assert not eng.scheduler.waiting and not eng.scheduler.running
    eng.pool.check_invariants(expect_idle=True)
    assert eng.pool.num_free == eng.pool.num_blocks


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.data())
def test_token_ids_slice_is_a_slice_of_all_tokens(n_prompt, n_out, data):
    r = _req("s", list(range(100, 100 + n_prompt)))
    r.output_token_ids = list(range(500, 500 + n_out))
    n = n_prompt + n_out
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(start, n))
    assert r.token_ids_slice(start, end) == r.all_token_ids[start:end]
