"""`kestrel bench serve` and `kestrel bench sweep`: a client against OpenAI-compatible servers,
and sweeps of servers (request rates, concurrencies) or of in-process engine configs (batch
sizes). The parsers live with the other bench commands in ``kestrel.bench.cli``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from kestrel.bench.cli import _finish, _workload, set_threads
from kestrel.engine.args import engine_args_from_cli


def _client_tokenizer(ns: Any) -> tuple[Any, int]:
    """(tokenizer or None, vocabulary size) for building the client's prompts."""
    if ns.tokenizer is None and ns.vocab_size is not None and ns.prompt_source == "random" \
            and ns.prompt_format == "ids":
        return None, ns.vocab_size
    from kestrel.loader.tokenizer import load_tokenizer

    if ns.tokenizer is None:
        from kestrel.loader.pull import pull_default_model

        ns.tokenizer = str(pull_default_model(progress=False))
    try:
        tok = load_tokenizer(ns.tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer {ns.tokenizer!r}: {e}") from None
    return tok, ns.vocab_size or len(tok)


def _serve_requests(ns: Any, point: int = 0) -> list:
    """The workload's requests; ``point`` > 0 (later points of a sweep): the same lengths with
    other prompt tokens, so that no point finds the previous one's prompts in a prefix cache."""
    from kestrel.bench.serve import build_serve_requests
    from kestrel.bench.workloads import make_prompts

    wl = _workload(ns)
    tok, vocab = _client_tokenizer(ns)
    lengths = wl.lengths(ns.workload_seed)
    prompts = make_prompts([i for i, _ in lengths], vocab, ns.prompt_source,
                           ns.workload_seed + point, tok, ns.text)
    return build_serve_requests(lengths, prompts, ns.prompt_format, tok)


def _serve_options(ns: Any, base_url: str, model: str | None) -> Any:
    from kestrel.bench.serve import ServeOptions

    return ServeOptions(base_url=base_url, model=model, endpoint=ns.endpoint,
                        request_rate=getattr(ns, "request_rate", math.inf),
                        burstiness=ns.burstiness,
                        max_concurrency=getattr(ns, "max_concurrency", None),
                        timeout_s=ns.timeout, ignore_eos=ns.ignore_eos, seed=ns.workload_seed,
                        progress=ns.progress,
                        api_key=ns.api_key or os.environ.get("OPENAI_API_KEY"))


def _report_failures(res: dict) -> int:
    """Failed requests named on stderr; exit status 1 when none succeeded."""
    if not res["failed"]:
        return 0
    top = "; ".join(f"{n} x {msg}" for msg, n in list(res["errors"].items())[:3])
    print(f"kestrel bench: {res['failed']} of {res['num_requests']} requests failed: {top}",
          file=sys.stderr)
    return 1 if res["completed"] == 0 else 0


def run_serve(ns: Any) -> int:
    from kestrel.bench.metrics import parse_slo
    from kestrel.bench.serve import run_serve as serve
    from kestrel.bench.serve import serve_rows

    set_threads(ns)
    slo = parse_slo(ns.goodput)
    reqs = _serve_requests(ns)
    res = serve(_serve_options(ns, ns.base_url, ns.model), reqs, slo, ns.gpu_hour_price,
                ns.num_gpus)
    res["workload"] = ns.workload
    _finish(ns, f"serve: {ns.workload} at {ns.request_rate:g} req/s", res, serve_rows(res),
            None)
    return _report_failures(res)


def run_sweep(ns: Any) -> int:
    from kestrel.bench.report import environment, print_grid, write_json
    from kestrel.bench.sweep import plot_sweep, sweep_table

    set_threads(ns)
    res = _sweep_servers(ns) if ns.server else _sweep_offline(ns)
    res["env"] = environment(None, getattr(ns, "_argv", None))
    header, rows = sweep_table(res)
    print_grid(f"sweep ({res['mode']})", header, rows)
    res["plot"] = str(plot_sweep(res, ns.plot, res["env"]))
    print(f"plot: {res['plot']}", file=sys.stderr)
    write_json(res, ns.json_path)
    failed = sum(p.get("failed", 0) for p in res["points"])
    if failed:
        print(f"kestrel bench: {failed} requests failed across the sweep", file=sys.stderr)
    return 0


def _sweep_servers(ns: Any) -> dict:
    from kestrel.bench.metrics import parse_slo
    from kestrel.bench.sweep import parse_labeled, parse_values, sweep_servers

    if (ns.request_rates is None) == (ns.concurrencies is None):
        raise ValueError("server sweep: give exactly one of --request-rates, --concurrencies")
    servers = {label: _serve_options(ns, url, ns.model)
               for label, url in parse_labeled(ns.server, "--server").items()}
    if ns.request_rates is not None:
        mode, values = "rate", parse_values(ns.request_rates, "--request-rates", True)
    else:
        mode, values = "concurrency", parse_values(ns.concurrencies, "--concurrencies")
    return sweep_servers(servers, lambda point: _serve_requests(ns, point), values, mode,
                         parse_slo(ns.goodput), ns.gpu_hour_price, ns.num_gpus)


def _sweep_offline(ns: Any) -> dict:
    import shlex

    from kestrel.bench.sweep import parse_labeled, parse_values, sweep_offline

    sizes = [int(v) for v in parse_values(ns.batch_sizes, "--batch-sizes")]
    labeled = parse_labeled(ns.config, "--config") or {"default": ""}
    configs = {}
    for label, flags in labeled.items():
        sub = argparse.Namespace(**vars(ns))
        try:
            ns._parser.parse_args(shlex.split(flags), namespace=sub)
        except SystemExit:
            raise ValueError(f"--config {label}: cannot parse flags {flags!r}") from None
        configs[label] = engine_args_from_cli(sub)
    i_len, o_len = ns.input_len or 32, ns.output_len or 16
    ceilings = None
    if not ns.no_roofline:
        from kestrel.bench.roofline import measure_roofline

        ceilings = measure_roofline(next(iter(configs.values())).device or _default_device())
    res = sweep_offline(configs, sizes, i_len, o_len, ns.bench_iters, ceilings)
    res["configs"] = labeled
    res["ceilings"] = ceilings
    return res


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
