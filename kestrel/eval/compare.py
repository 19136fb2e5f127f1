"""A quantized (or lower-precision) model against its baseline on the same real text.

Per scored position t of every window (t = 0 .. len − 2, predicting token t + 1):
- KL(P_baseline ‖ P_candidate) of the next-token distributions (nats); mean and p99.
- top-1 agreement: whether both put their highest probability on the same token.
Per window ("sequence"): the log-likelihood of the real text under each model; the histogram of
candidate − baseline differences is the analogue of the Llama 3 paper's Figure 26 (reward
score distributions of BF16 vs FP8). Perplexity of each over all windows, and the delta.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kestrel.bench.metrics import stats
from kestrel.eval.perplexity import batch_logits, batches, summarize_nll, target_logprobs


def window_divergence(base_logits: torch.Tensor, cand_logits: torch.Tensor,
                      ids: list[int]) -> dict:
    """KL per position, top-1 agreement per position and each model's log-likelihood."""
    lb = torch.log_softmax(base_logits[:-1].float(), dim=-1)  # [L-1, V]
    lc = torch.log_softmax(cand_logits[:-1].float(), dim=-1)
    kl = (lb.exp() * (lb - lc)).sum(-1).clamp_min(0.0)  # [L-1]; rounding can dip below 0
    agree = lb.argmax(-1) == lc.argmax(-1)
    return {"kl": kl.double().cpu().numpy(), "agree": agree.cpu().numpy(),
            "ll_base": float(target_logprobs(base_logits, ids).double().sum()),
            "ll_cand": float(target_logprobs(cand_logits, ids).double().sum())}


def compare_models(base: Any, cand: Any, windows: list[list[int]], progress: bool = False,
                   batch_size: int = 8) -> dict:
    """Run every window through both engines and summarize their disagreement."""
    kls, agrees, ll_b, ll_c = [], [], [], []
    with tqdm(total=len(windows), desc="compare", disable=not progress) as bar:
        for group in batches(windows, batch_size):
            pairs = zip(group, batch_logits(base, group, "base"), batch_logits(cand, group, "cand"))
            for w, lb, lc in pairs:
                d = window_divergence(lb, lc, w)
                kls.append(d["kl"])
                agrees.append(d["agree"])
                ll_b.append(d["ll_base"])
                ll_c.append(d["ll_cand"])
            bar.update(len(group))
    return summarize(np.concatenate(kls), np.concatenate(agrees), ll_b, ll_c, len(windows[0]))


def summarize(kl: np.ndarray, agree: np.ndarray, ll_base: list[float], ll_cand: list[float],
              window: int) -> dict:
    pb = summarize_nll([-x for x in ll_base], window)
    pc = summarize_nll([-x for x in ll_cand], window)
    diff = [c - b for b, c in zip(ll_base, ll_cand)]
    return {
        "num_sequences": len(ll_base), "window": window, "positions": int(kl.size),
        "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()), "top1_agreement": float(agree.mean()),
        "ppl_baseline": pb["perplexity"], "ppl_candidate": pc["perplexity"],
        "ppl_delta": pc["perplexity"] - pb["perplexity"],
        "ppl_delta_rel": pc["perplexity"] / pb["perplexity"] - 1.0,
        "seq_ll_diff": diff, "seq_ll_diff_stats": stats(diff),
        "seq_ll_diff_p1": float(np.percentile(diff, 1)) if diff else math.nan,
    }


def compare_rows(res: dict) -> list[tuple[str, object]]:
    s = res["seq_ll_diff_stats"]
    return [
        ("baseline", res["baseline"]), ("candidate", res["candidate"]),
        ("sequences x tokens", f"{res['num_sequences']} x {res['window']}"),
        ("KL mean (nats/token)", res["kl_mean"]), ("KL p99", res["kl_p99"]),
        ("KL max", res["kl_max"]), ("top-1 agreement", res["top1_agreement"]),
        ("perplexity baseline", res["ppl_baseline"]),
        ("perplexity candidate", res["ppl_candidate"]),
        ("perplexity delta (relative)", res["ppl_delta_rel"]),
        ("seq log-lik diff mean (nats)", s["mean"]),
        ("seq log-lik diff p1 / p99", f"{res['seq_ll_diff_p1']:.3f} / {s['p99']:.3f}"),
    ]
