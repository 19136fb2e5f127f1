"""The `kestrel` command. Each feature module adds its own subcommand (``register(sub)``)."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import signal
import sys

from kestrel.executor.loading import DoesNotFitError

# Feature modules that contribute subcommands: each has register(subparsers).
_COMMANDS = ("kestrel.cli_generate", "kestrel.server.cli", "kestrel.bench.cli",
             "kestrel.eval.cli", "kestrel.quant.cli", "kestrel.parallel.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kestrel", description="Kestrel LLM inference engine")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # an optional dependency of that feature is missing
                logging.getLogger(__name__).debug("%s unavailable: %s", name, e)
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        # `kill -USR1 PID` prints where it is stuck (to the real stderr: a captured or
        # replaced sys.stderr may have no file descriptor)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"kestrel: error: {e}", file=sys.stderr)
        return 2
    except DoesNotFitError as e:  # memory the configuration asks for: what to change, no trace
        print(f"kestrel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
