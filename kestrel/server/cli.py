"""`kestrel serve`: load a model, bind, and serve the OpenAI-compatible API until SIGTERM.

Shutdown is graceful: on SIGTERM (or Ctrl-C) new requests get 503 and the listening socket
closes, running requests get ``--shutdown-timeout`` seconds to finish, then the rest end with a
clear error event (streams) or a 503 (whole responses), and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn

from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli, load_engine_tokenizer
from kestrel.engine.async_engine import AsyncEngine, EngineStoppedError
from kestrel.server.api import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("kestrel.server")
DEFAULT_MAX_WAITING = 1024


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free port, logged)")
    g.add_argument("--api-key", default=os.environ.get("KESTREL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $KESTREL_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model (default: the model folder's name)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    g.add_argument("--uvicorn-log-level", default="warning")
    add_engine_cli_args(p)
    if not any("--max-waiting" in a.option_strings for a in p._actions):
        p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                       help="waiting-queue bound; past it requests get 503 with Retry-After")
    p.set_defaults(func=run_serve)


def served_names(model: str, given: list[str] | None) -> list[str]:
    if given:
        return list(given)
    path = Path(model)
    names = [path.name] if path.name and path.name != model else []
    return names + [model]


def run_serve(ns: Any) -> int:
    from kestrel.engine.engine import Engine, heap_frozen
    from kestrel.server.api import build_app
    from kestrel.server.metrics import ServerMetrics

    if ns.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {ns.max_request_body_bytes}")
    cfg = engine_args_from_cli(ns).create_config(usage="server")  # streams wait for each step
    engine = Engine(cfg, load_engine_tokenizer(cfg))
    names = served_names(cfg.model, ns.served_model_name)
    log.info("loaded %s (%.1fM parameters, %s on %s); max_model_len=%d, max_num_seqs=%d, "
             "max_num_batched_tokens=%d, %d KV blocks; served as %s", cfg.model,
             cfg.model_config.num_params() / 1e6, str(cfg.dtype).replace("torch.", ""),
             cfg.device, cfg.scheduler.max_model_len, cfg.scheduler.max_num_seqs,
             cfg.scheduler.max_num_batched_tokens, engine.pool.num_blocks, names[0])
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, listener=metrics)
    app = build_app(async_engine, names, api_key=ns.api_key,
                    max_body_bytes=ns.max_request_body_bytes, metrics=metrics)
    sock = _bind(ns.host, ns.port)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (OpenAI API under /v1; auth %s)",
             f"[{host}]" if ":" in host else host, port, "on" if ns.api_key else "off")
    config = uvicorn.Config(app, log_level=ns.uvicorn_log_level, access_log=False,
                            timeout_graceful_shutdown=int(ns.shutdown_timeout) + 5,
                            timeout_keep_alive=5)
    server = _GracefulServer(config, async_engine, ns.shutdown_timeout)
    with heap_frozen():
        server.run(sockets=[sock])
    log.info("server stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so --port 0 works and the logged address is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, plus: on the first signal, drain the engine before closing."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float
                 ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self._draining:
            self._draining = True
            log.info("signal %d: draining (%d running requests, up to %.0fs)", sig,
                     self.engine.num_live_requests(), self.drain_timeout)
            self.engine.stop_accepting("server is shutting down")
            try:  # signal handlers run on the main thread, which runs the event loop
                loop = asyncio.get_running_loop()
                loop.call_soon_threadsafe(loop.call_later, self.drain_timeout, self._expire)
            except RuntimeError:
                pass
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()  # a drained shutdown is a clean exit, not death by signal

    def _expire(self) -> None:
        if self.engine.num_live_requests():
            log.warning("drain timeout: aborting %d requests", self.engine.num_live_requests())
        self.engine.fail_all(EngineStoppedError(
            f"server shut down; the request did not finish within {self.drain_timeout:.0f}s"))
