"""Metric definitions on synthetic timestamps: every figure is computed by hand and compared."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kestrel.bench import metrics as M
from kestrel.bench.serve import arrival_offsets
from kestrel.bench.workloads import (
    WORKLOADS,
    get_workload,
    random_prompts,
    text_prompts,
    usable_token_ids,
)


def rec(start, chunks, out_len, ok=True, prompt=10, error=""):
    end = chunks[-1] if chunks else start + 1.0
    return M.RequestRecord(prompt_len=prompt, output_len=out_len, start=start,
                           chunk_times=list(chunks), end=end, success=ok, error=error)


def test_per_request_definitions():
    r = rec(10.0, [10.5, 10.75, 11.0, 11.5], 4)
    assert M.ttft(r) == pytest.approx(0.5)
    assert M.e2e(r) == pytest.approx(1.5)
    assert M.tpot(r) == pytest.approx((1.5 - 0.5) / 3)
    assert M.itls(r) == pytest.approx([0.25, 0.25, 0.5])


def test_tpot_counts_tokens_not_chunks():
    # 2 chunks carrying 5 tokens: decode time spread over the 4 tokens after the first
    r = rec(0.0, [0.2, 1.0], 5)
    assert M.tpot(r) == pytest.approx(0.8 / 4)
    assert M.itls(r) == pytest.approx([0.8])


def test_single_token_has_no_tpot():
    assert M.tpot(rec(0.0, [0.3], 1)) is None
    with pytest.raises(ValueError):
        M.ttft(rec(0.0, [], 0))


def test_stats_interpolated_percentiles():
    vals = [4.0, 1.0, 3.0, 2.0]
    s = M.stats(vals)
    srt = sorted(vals)

    def pct(p):  # linear interpolation between order statistics, by hand
        k = p / 100 * (len(srt) - 1)
        lo = math.floor(k)
        hi = min(lo + 1, len(srt) - 1)
        return srt[lo] + (srt[hi] - srt[lo]) * (k - lo)

    assert s["mean"] == pytest.approx(sum(vals) / len(vals))
    assert s["median"] == pytest.approx(pct(50))
    assert s["p90"] == pytest.approx(pct(90))
    assert s["p99"] == pytest.approx(pct(99))
    assert M.stats([0.5], scale=1e3)["p99"] == pytest.approx(500.0)
    assert M.stats([])["mean"] is None


def test_goodput_counts_only_successes_within_every_slo():
    recs = [
        rec(0.0, [0.1, 0.2, 0.3], 3),  # ttft .1, tpot .1: meets both
        rec(0.0, [0.5, 0.6], 2),  # ttft .5: misses ttft
        rec(0.0, [0.1, 0.9], 2),  # tpot .8: misses tpot
        rec(0.0, [0.1], 1),  # no tpot: judged on ttft only, meets it
        rec(0.0, [0.1, 0.2], 2, ok=False, error="HTTP 500"),  # failed: never counts
    ]
    slo = {"ttft": 0.2, "tpot": 0.2}
    assert [M.meets_slo(r, slo) for r in recs] == [True, False, False, True, False]
    assert M.goodput(recs, 4.0, slo) == pytest.approx(2 / 4.0)
    with pytest.raises(ValueError):
        M.meets_slo(recs[0], {"latency": 1.0})


def test_aggregate_keeps_failures_out_of_latency():
    ok1 = rec(0.0, [0.2, 0.4, 0.6], 3, prompt=7)
    ok2 = rec(1.0, [1.4, 1.5], 2, prompt=5)
    bad = rec(0.0, [0.01, 0.02], 50, ok=False, prompt=100, error="stream ended before [DONE]")
    res = M.aggregate([ok1, ok2, bad], duration=2.0)
    assert (res["completed"], res["failed"], res["num_requests"]) == (2, 1, 3)
    assert res["errors"] == {"stream ended before [DONE]": 1}
    assert res["total_output_tokens"] == 5 and res["total_input_tokens"] == 12
    assert res["output_throughput"] == pytest.approx(5 / 2.0)
    assert res["total_token_throughput"] == pytest.approx(17 / 2.0)
    assert res["request_throughput"] == pytest.approx(2 / 2.0)
    assert res["requests_per_min"] == pytest.approx(60 * 2 / 2.0)
    ttfts = [M.ttft(ok1), M.ttft(ok2)]
    assert res["ttft_ms"]["mean"] == pytest.approx(1e3 * sum(ttfts) / 2)
    assert res["tpot_ms"]["median"] == pytest.approx(1e3 * np.median([M.tpot(ok1),
                                                                       M.tpot(ok2)]))
    assert res["itl_ms"]["mean"] == pytest.approx(1e3 * np.mean(M.itls(ok1) + M.itls(ok2)))
    assert res["e2e_ms"]["p99"] == pytest.approx(1e3 * np.percentile([0.6, 0.5], 99))


def test_cost():
    c = M.cost(duration=1800.0, gpu_hour_price=2.0, num_gpus=4, completed=8,
               output_tokens=500_000)
    dollars = 2.0 * 4 * 0.5
    assert c["total_usd"] == pytest.approx(dollars)
    assert c["usd_per_request"] == pytest.approx(dollars / 8)
    assert c["usd_per_million_output_tokens"] == pytest.approx(dollars / 0.5)
    res = M.aggregate([rec(0.0, [0.5, 1.0], 2)], 3600.0, gpu_hour_price=3.0)
    assert res["cost"]["usd_per_request"] == pytest.approx(3.0)


def test_parse_slo():
    assert M.parse_slo(["ttft:500", "tpot:50"]) == {"ttft": 0.5, "tpot": 0.05}
    for bad in (["ttft"], ["latency:5"], ["ttft:abc"], ["e2e:-1"]):
        with pytest.raises(ValueError):
            M.parse_slo(bad)


def test_arrivals_gamma_mean_and_burstiness():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    for k in (1.0, 0.25):
        t = np.array(arrival_offsets(4001, rate=4.0, burstiness=k, seed=1))
        gaps = np.diff(t)
        assert t[0] == 0.0 and np.all(gaps >= 0)
        assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.1)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(k), rel=0.15)


def test_workloads():
    assert get_workload("llama3-paper").lengths()[0] == (4096, 256)
    assert get_workload("trtllm-120k-2k").lengths()[0] == (120000, 2048)
    mixed = get_workload("mixed-100-1024").lengths(seed=3)
    assert len(mixed) == 256
    assert all(100 <= i <= 1024 and 100 <= o <= 1024 for i, o in mixed)
    assert len({i for i, _ in mixed}) > 50  # actually spread, not one length
    chat = get_workload("chat").lengths()
    assert all(8 <= i <= 4096 and 8 <= o <= 1024 for i, o in chat)
    assert {"trtllm-2k-128", "trtllm-32k-2k"} <= set(WORKLOADS)
    tiny = get_workload("trtllm-2k-128").with_overrides(3, 16, 4)
    assert tiny.lengths() == [(16, 4)] * 3
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        get_workload("nope")


def test_prompts_exact_lengths():
    ps = random_prompts([5, 17, 1], vocab_size=1000, seed=0)
    assert [len(p) for p in ps] == [5, 17, 1]
    allowed = set(usable_token_ids(1000).tolist())
    assert all(t in allowed for p in ps for t in p)
    assert ps != random_prompts([5, 17, 1], vocab_size=1000, seed=1)
    corpus = list(range(50))
    ts = text_prompts([10, 120], corpus, seed=0)
    assert [len(p) for p in ts] == [10, 120]
    assert all(b == (a + 1) % 50 for p in ts for a, b in itertools.pairwise(p))
