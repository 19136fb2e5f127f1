"""Results out: the environment every figure carries, JSON files, rich tables, matplotlib plots.

Every result names the device, the date, the git commit and the command line, so any figure
in docs/PERFORMANCE.md can be traced to a rerunnable command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def startup_rows(res: dict) -> list[tuple[str, object]]:
    """The engine's start-up time, and where it went when the executor says (one process)."""
    rows: list[tuple[str, object]] = []
    if "startup_s" in res:
        rows.append(("engine start-up (s)", res["startup_s"]))
    if res.get("startup_phases_s"):
        rows.append(("  model / KV sizing (first forward) / graphs (s)",
                     " / ".join(f"{v:.1f}" for v in res["startup_phases_s"].values())))
    return rows


def device_name(device: str | torch.device | None = None) -> str:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (x{torch.cuda.device_count()})"
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the checkout kestrel runs from, "-dirty" when kestrel/ differs from it.

    A copy without .git (a lent GPU machine) reports $KESTREL_GIT_COMMIT, else "unknown".
    """
    root = Path(__file__).resolve().parents[2]
    fallback = os.environ.get("KESTREL_GIT_COMMIT", "unknown")
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kestrel"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=False)
    except (OSError, subprocess.SubprocessError):
        return fallback
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "kestrel " + shlex.join(args)


class RecordingSubParsers(argparse._SubParsersAction):
    """Subcommands that remember their own words (``bench latency --batch 4 ...``) in the
    namespace as ``_argv``, so a result names its command even when ``kestrel.cli.main(argv)``
    runs in-process and ``sys.argv`` belongs to someone else."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None
                 ) -> None:
        prefix = list(getattr(namespace, "_argv_prefix", []))
        super().__call__(parser, namespace, values, option_string)
        namespace._argv = [*prefix, *values]


def environment(device: str | torch.device | None = None,
                argv: Sequence[str] | None = None) -> dict[str, str]:
    env = {"device": device_name(device),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": git_commit(), "command": command_line(argv),
           "torch": torch.__version__, "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # on a shared CPU, how busy the neighbours were
        env["load_avg_1m"] = f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    return env


def _clean(x: Any) -> Any:
    """JSON has no inf/nan: they become null (and strings for dict keys stay strings)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict, path: str | Path | None) -> None:
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(result), indent=2) + "\n")


def fmt(value: Any) -> str:
    """Four significant digits for small numbers, one decimal for large ones."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-4):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_table(title: str, rows: Sequence[tuple[str, Any]], env: dict | None = None) -> None:
    """A two-column table, with the environment lines under it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, fmt(value))
    console = Console()
    console.print(table)
    if env:
        load = f" | load {env['load_avg_1m']}" if "load_avg_1m" in env else ""
        console.print(f"[dim]{env['device']} | {env['date']} | commit {env['commit']}{load}\n"
                      f"{env['command']}[/dim]", highlight=False, soft_wrap=True)


def print_grid(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A many-column table (sweeps)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    Console().print(table)


def _footer(fig: Any, env: dict | None) -> None:
    if env:
        fig.text(0.01, 0.005, f"{env['device']} | {env['date']} | {env['commit']}",
                 fontsize=7, color="gray")


def plot_curves(path: str | Path, panels: Sequence[dict], title: str,
                env: dict | None = None) -> Path:
    """Throughput–latency curves: one panel per metric, one line per configuration.

    Each panel: {"xlabel", "ylabel", "curves": {label: (xs, ys, point_labels)}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys, names) in panel["curves"].items():
            ax.plot(xs, ys, marker="o", label=label)
            for x, y, n in zip(xs, ys, names):
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _footer(fig, env)
    return _save(fig, path)


def plot_histogram(path: str | Path, values: Sequence[float], title: str, xlabel: str,
                   env: dict | None = None, bins: int = 60) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sequences")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _footer(fig, env)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
