"""`kestrel eval perplexity|compare`: quality figures as rerunnable commands."""

from __future__ import annotations

import dataclasses
import gc
import sys
from typing import Any

from kestrel.bench.cli import set_threads
from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="quality: perplexity, quantized vs baseline comparison")
    from kestrel.bench.report import RecordingSubParsers

    p.set_defaults(_argv_prefix=["eval"])
    esub = p.add_subparsers(dest="eval_command", required=True, action=RecordingSubParsers)

    pp = esub.add_parser("perplexity", help="perplexity over non-overlapping text windows",
                         allow_abbrev=False)
    _text_args(pp, window=512, count=None)
    pp.add_argument("--baseline", choices=["none", "hf"], default="none",
                    help="hf: also transformers' perplexity on the same windows")
    add_engine_cli_args(pp)
    pp.set_defaults(func=run_perplexity)

    pc = esub.add_parser("compare", help="KL, top-1 agreement, perplexity delta, histogram",
                         allow_abbrev=False)
    _text_args(pc, window=128, count=512)
    pc.add_argument("--baseline", default="none",
                    help="the baseline's quantization: none (default) or a method name")
    pc.add_argument("--baseline-dtype", default=None,
                    help="the baseline's dtype (default: the candidate's), e.g. float32")
    pc.add_argument("--baseline-model", default=None,
                    help="the baseline's model folder (default: the candidate's), e.g. the "
                         "float folder a `kestrel quantize` output came from")
    pc.add_argument("--plot", default="eval-compare-hist.png")
    add_engine_cli_args(pc)
    pc.set_defaults(func=run_compare)


def _text_args(p: Any, window: int, count: int | None) -> None:
    g = p.add_argument_group("text")
    g.add_argument("--text", default="pydoc", help="a UTF-8 text file, or pydoc (default)")
    g.add_argument("--window", "--seq-len", dest="window", type=int, default=window,
                   help="tokens per window")
    g.add_argument("--max-windows", "--num-sequences", dest="max_windows", type=int,
                   default=count, help="windows to score (default: all for perplexity)")
    g.add_argument("--batch-windows", type=int, default=8,
                   help="windows per forward pass (larger: faster, more memory)")
    g.add_argument("--json", dest="json_path", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _eval_args(ns: Any) -> Any:
    """Engine args sized for one window at a time (unless the user sized the engine)."""
    from kestrel.eval.perplexity import eval_engine_kwargs

    args = engine_args_from_cli(ns)
    sized = eval_engine_kwargs(ns.window, ns.batch_windows, args.block_size)
    if args.max_model_len is None:
        args.max_model_len = sized["max_model_len"]
    if args.num_kv_blocks is None:
        args.num_kv_blocks = sized["num_kv_blocks"]
    return args


def _windows(llm: Any, ns: Any) -> list[list[int]]:
    from kestrel.eval.perplexity import corpus_ids, token_windows

    return token_windows(corpus_ids(llm.get_tokenizer(), ns.text), ns.window, ns.max_windows)


def _finish(ns: Any, title: str, res: dict, rows: list, device: str) -> None:
    from kestrel.bench.report import environment, print_table, write_json

    res["env"] = environment(device, getattr(ns, "_argv", None))
    print_table(title, rows, res["env"])
    write_json(res, ns.json_path)


def run_perplexity(ns: Any) -> int:
    from kestrel.engine.llm import LLM
    from kestrel.eval.perplexity import load_corpus, perplexity

    set_threads(ns)
    load_corpus(ns.text)  # a bad --text fails before minutes of model loading
    llm = LLM(**vars(_eval_args(ns)))
    cfg = llm.engine.cfg
    windows = _windows(llm, ns)
    res = perplexity(llm, windows, ns.progress, ns.batch_windows)
    res.update({"model": cfg.model, "dtype": str(cfg.dtype), "quantization": cfg.quant.method,
                "text": ns.text})
    rows: list[tuple[str, object]] = [
        ("model", cfg.model), ("dtype / quantization", f"{cfg.dtype} / {cfg.quant.method}"),
        ("text", ns.text), ("windows x tokens", f"{res['num_windows']} x {ns.window}"),
        ("tokens scored", res["tokens_scored"]), ("perplexity", res["perplexity"])]
    if ns.baseline == "hf":
        from kestrel.bench.hf_baseline import load_hf_model
        from kestrel.eval.perplexity import hf_perplexity

        llm.engine.executor.shutdown()
        del llm
        gc.collect()
        hf = hf_perplexity(load_hf_model(cfg), windows, ns.progress, ns.batch_windows)
        res["hf"] = {k: v for k, v in hf.items() if k != "window_nll"}
        res["hf_rel_diff"] = res["perplexity"] / hf["perplexity"] - 1.0
        rows += [("transformers perplexity", hf["perplexity"]),
                 ("relative difference", res["hf_rel_diff"])]
    _finish(ns, "perplexity", res, rows, cfg.device)
    return 0


def run_compare(ns: Any) -> int:
    from kestrel.bench.report import plot_histogram
    from kestrel.engine.llm import LLM
    from kestrel.eval.compare import compare_models, compare_rows
    from kestrel.eval.perplexity import load_corpus

    set_threads(ns)
    load_corpus(ns.text)
    cand_args = _eval_args(ns)
    base_args = dataclasses.replace(
        cand_args, quantization=None if ns.baseline == "none" else ns.baseline,
        dtype=ns.baseline_dtype or cand_args.dtype, kv_cache_dtype="auto",
        model=ns.baseline_model or cand_args.model)
    base = LLM(**vars(base_args))
    cand = LLM(**vars(cand_args))
    windows = _windows(cand, ns)
    if ns.max_windows and len(windows) < ns.max_windows:
        print(f"kestrel eval: the text holds only {len(windows)} windows of {ns.window} tokens",
              file=sys.stderr)
    res = compare_models(base, cand, windows, ns.progress, ns.batch_windows)
    res["baseline"] = _describe(base)
    res["candidate"] = _describe(cand)
    res["text"] = ns.text
    device = cand.engine.cfg.device
    from kestrel.bench.report import environment

    env = environment(device, getattr(ns, "_argv", None))
    res["plot"] = str(plot_histogram(
        ns.plot, res["seq_ll_diff"],
        f"log-likelihood per {ns.window}-token sequence: {res['candidate']} - "
        f"{res['baseline']} ({res['num_sequences']} sequences)",
        "candidate - baseline log-likelihood (nats)", env))
    _finish(ns, "compare", res, compare_rows(res) + [("histogram", res["plot"])], device)
    return 0


def _describe(llm: Any) -> str:
    cfg = llm.engine.cfg
    parts = [str(cfg.dtype).replace("torch.", ""), cfg.quant.method]
    if cfg.cache.kv_cache_dtype != "auto":
        parts.append(f"kv-{cfg.cache.kv_cache_dtype}")
    return "+".join(p for p in parts if p)
