"""User-facing engine arguments (vLLM's names) → a frozen EngineConfig and a tokenizer."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kestrel.config import (KV_CACHE_DTYPES, CacheConfig, EngineConfig, ParallelConfig,
                            QuantConfig, SchedulerConfig, SpeculativeConfig,
                            cpu_has_native_bf16, resolve_dtype)
from kestrel.loader.dummy import PRESETS, preset_config
from kestrel.loader.hf import load_model_config, read_config

log = logging.getLogger(__name__)

# The step token budget (tokens a step computes: chunked-prefill size) when
# --max-num-batched-tokens is not given. Bigger chunks run the GEMMs nearer their rate and
# re-read the running requests' KV cache in fewer steps, but every running stream waits for
# the whole step. H200, llama-3-8b, `gpu_check.sh budget` (fifteenth session), output tok/s at
# 2,048 / 4,096 / 8,192 / 16,384: llama3-paper 32 requests 1,315 / 1,366 / 1,404 / 1,414,
# 64 requests 1,334 / 1,453 / 1,529 / 1,568, mixed-100-1024 9,462 / 9,719 / 9,891 / 9,960. So
# Hopper GPUs with room for the activations take vLLM's budgets there: 16,384 offline and
# 8,192 for the server (a step of 8k prompt tokens holds the streams for ~0.2 s on an 8B).
# Elsewhere (CPU, smaller GPUs; not measured) 2,048.
TOKEN_BUDGET = 2048
BIG_GPU_TOKEN_BUDGET = {"offline": 16384, "server": 8192}
BIG_GPU_BYTES = 70 * 2**30


def default_token_budget(device: str, usage: str = "offline") -> int:
    """The step token budget when none is given, for ``usage`` "offline" (LLM, bench) or
    "server"; see BIG_GPU_TOKEN_BUDGET."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9 \
            and torch.cuda.get_device_properties(dev).total_memory >= BIG_GPU_BYTES:
        return BIG_GPU_TOKEN_BUDGET[usage]
    return TOKEN_BUDGET


@dataclass
class EngineArgs:
    model: str | None = None  # folder, .gguf file, preset name (with load_format dummy), or None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None  # None: cuda if available else cpu
    load_format: str = "auto"
    quantization: str | None = None
    fp8_activation_scale_ub: float = 1200.0
    fp8_attention: bool = False
    fp8_skip_layers: bool = True
    fp8_fast_accum: bool = True
    int8_threshold: float = 6.0  # LLM.int8(): input features this large stay in float
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    disable_custom_all_reduce: bool = False
    pipeline_micro_batches: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    kv_cache_memory_bytes: int | None = None  # CPU pool size
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    max_waiting: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    attention_backend: str = "auto"
    debug_checks: bool = False
    async_scheduling: bool | None = None
    speculative_method: str | None = None  # "ngram": prompt lookup
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    speculative_disable_batch_size: int | None = None

    def create_config(self, usage: str = "offline") -> EngineConfig:
        """``usage``: "offline" or "server", which picks the default step token budget
        (``default_token_budget``)."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.dtype == "auto" and device == "cpu" and cpu_has_native_bf16():
            log.info("float32 on CPU (the exact path); this CPU multiplies bfloat16 natively: "
                     "--dtype bfloat16 runs ~1.6-2x faster (docs/PERFORMANCE.md, CPU figures)")
        model_path, load_format = resolve_model(self.model, self.load_format)
        if load_format == "dummy":
            mcfg = (preset_config(model_path) if model_path in PRESETS
                    else load_model_config(model_path))
        else:
            mcfg = load_model_config(model_path)
        max_len = self.max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context "
                             f"({mcfg.max_position_embeddings} positions)")
        quant = _quant_config(self, model_path if load_format != "dummy" else None)
        cache_kw: dict[str, Any] = {}
        if self.kv_cache_memory_bytes is not None:
            cache_kw["cpu_kv_cache_bytes"] = self.kv_cache_memory_bytes
        return EngineConfig(
            model=model_path, model_config=mcfg, tokenizer=self.tokenizer,
            dtype=resolve_dtype(self.dtype, device), device=device, seed=self.seed,
            load_format=load_format, attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager, debug_checks=self.debug_checks,
            async_scheduling=self.async_scheduling,
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching,
                              kv_cache_dtype=self.kv_cache_dtype, **cache_kw),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self._token_budget(max_len, device, usage),
                max_num_seqs=self.max_num_seqs, max_model_len=max_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                policy=self.scheduling_policy, max_waiting=self.max_waiting),
            parallel=ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                    custom_all_reduce=not self.disable_custom_all_reduce,
                                    pipeline_micro_batches=self.pipeline_micro_batches),
            quant=quant,
            speculative=SpeculativeConfig(self.speculative_method, self.num_speculative_tokens,
                                          self.prompt_lookup_max, self.prompt_lookup_min,
                                          self.speculative_disable_batch_size),
        )

    def _token_budget(self, max_len: int, device: str, usage: str) -> int:
        if self.enable_chunked_prefill:
            return self.max_num_batched_tokens or default_token_budget(device, usage)
        return max(max_len, self.max_num_batched_tokens or 0)  # a whole prompt in one step


def _quant_config(args: EngineArgs, folder: str | None) -> QuantConfig:
    """From --quantization, or from the checkpoint's own quantization_config."""
    method = args.quantization
    qc = read_config(folder).get("quantization_config") if folder is not None else None
    if method == "gptq" and folder is not None and (qc or {}).get("quant_method") != "gptq":
        raise ValueError("--quantization gptq loads GPTQ-format checkpoints (quantization_config "
                         "with quant_method 'gptq'); this model has none")
    if (method in (None, "gptq")) and qc and qc.get("quant_method") == "gptq":
        from kestrel.quant.gptq import quant_config_from_gptq

        return quant_config_from_gptq(qc)
    if method is None and folder is not None:
        if qc:
            from kestrel.quant.fp8_checkpoint import quant_config_from_hf
            from kestrel.quant.sparse import quant_config_from_sparsity
            from kestrel.quant.w8a8 import quant_config_from_compressed_int8

            config = read_config(folder)
            found = quant_config_from_hf(config)
            if found is not None:
                return replace(found, fp8_fast_accum=args.fp8_fast_accum)
            found = (quant_config_from_compressed_int8(config)
                     or quant_config_from_sparsity(config))
            if found is not None:
                return found
            raise ValueError(f"{folder}: unsupported quantization_config {qc.get('quant_method')!r}")
    return QuantConfig(method=method, fp8_activation_scale_ub=args.fp8_activation_scale_ub,
                       fp8_attention=args.fp8_attention, fp8_skip_layers=args.fp8_skip_layers,
                       fp8_fast_accum=args.fp8_fast_accum,
                       extra={"int8_threshold": args.int8_threshold})


def kestrel_home() -> Path:
    return Path(os.environ.get("KESTREL_HOME", Path.home() / ".cache" / "kestrel"))


def resolve_model(model: str | None, load_format: str) -> tuple[str, str]:
    """Map what the user named to (a local HF folder or preset, load format). Never a hub."""
    if load_format == "dummy":
        if model is None:
            raise ValueError("load_format dummy needs a preset name or a model folder")
        if model in PRESETS or Path(model).is_dir():
            return model, "dummy"
        raise ValueError(f"unknown preset {model!r}; known: {sorted(PRESETS)}")
    if model is None:
        from kestrel.loader.pull import pull_default_model

        return str(pull_default_model()), "safetensors"
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), "safetensors"
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted_gguf(path)), "safetensors"
    if model in PRESETS:
        raise ValueError(f"{model!r} is a random-weight preset: pass load_format='dummy' "
                         f"(--load-format dummy) to use it")
    raise ValueError(f"model {model!r} not found: give a Hugging Face model folder, a .gguf file, "
                     f"or nothing for the default model (Kestrel never downloads from a hub)")


def _converted_gguf(path: Path) -> Path:
    """GGUF files are converted once to a cached HF folder keyed by their size and mtime."""
    from kestrel.loader.gguf import gguf_to_hf_folder

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    out = kestrel_home() / "converted" / f"{path.stem}-{key[:12]}"
    if not (out / "config.json").is_file():
        log.info("converting %s to %s", path, out)
        gguf_to_hf_folder(path, out)
    return out


def load_engine_tokenizer(cfg: EngineConfig) -> Any:
    """The model's tokenizer, or None for random-weight presets (token-id prompts only)."""
    source = cfg.tokenizer or (None if cfg.load_format == "dummy" else cfg.model)
    if source is None:
        return None
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in files):
        log.warning("%s has no tokenizer files: prompts must be token ids", source)
        return None
    from kestrel.loader.tokenizer import load_tokenizer

    return load_tokenizer(source)


def add_engine_cli_args(p: Any) -> None:
    """The engine flags every model-running command shares (vLLM's spellings)."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=None,
                   help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--preset", default=None,
                   help="random-weight model of a named shape, e.g. llama-3-8b (implies "
                        "--load-format dummy)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default=None)
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    g.add_argument("--quantization", "-q", default=None)
    g.add_argument("--fp8-activation-scale-ub", type=float, default=1200.0)
    g.add_argument("--fp8-attention", action="store_true")
    g.add_argument("--no-fp8-skip-layers", dest="fp8_skip_layers", action="store_false")
    g.add_argument("--fp8-fast-accum", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8 GEMMs through torch._scaled_mm (prefill, decode batches above 16 "
                        "rows) accumulate at the tensor cores' own precision, as fbgemm's Llama "
                        "3 kernels do (default): 8-14%% faster gate_up and qkv GEMMs at 4k rows "
                        "on an H200, more rounding error per GEMM, no measurable cost in "
                        "perplexity or KL (docs/QUANTIZATION.md); --no-fp8-fast-accum promotes "
                        "partial sums to float32. The small-batch GEMVs and the CPU emulation "
                        "accumulate in float32 either way")
    g.add_argument("--int8-threshold", type=float, default=6.0,
                   help="-q int8 (LLM.int8()): input features with a value this large in any "
                        "token are multiplied in float, not int8 (inf: none)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="CUDA TP: every all-reduce through NCCL (default: small ones through "
                        "a symmetric-memory one-shot kernel over NVLink)")
    g.add_argument("--pipeline-micro-batches", type=int, default=None, metavar="M",
                   help="PP: micro-batches in flight, at least pp (default pp + 1: the first "
                        "stage has one queued while the driver lands the oldest, samples and "
                        "schedules; each one more makes every stage re-read its weights once "
                        "more per round of decoded tokens)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one step computes, the chunked-prefill size (default: 16384 "
                        "offline and 8192 for the server on Hopper GPUs of >= 70 GiB, else "
                        "2048)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model dtype; fp8: e4m3 with per-layer, per-KV-head scales "
                        "calibrated at start-up (half the cache memory)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill",
                   action="store_false")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0, metavar="N",
                   help="> 0: no request computes more than N prompt tokens in one step, so a "
                        "long prompt shares each step with other prompts and keeps steps (and "
                        "the running streams' inter-token gaps) short; 0: up to the whole "
                        "budget")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true")
    g.add_argument("--attention-backend", default="auto")
    g.add_argument("--debug-checks", action="store_true")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare step N+1 while the device runs step N (default: on for CUDA; "
                        "off with speculative decoding)")
    _speculative_args(p)


def _speculative_args(p: Any) -> None:
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculative-method", default=None, choices=["ngram"],
                   help="ngram: prompt lookup, each decoding request's step also verifies the "
                        "tokens that followed the latest earlier occurrence of its last few "
                        "tokens (output distributed exactly as without it)")
    s.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="proposals verified per request and step")
    s.add_argument("--prompt-lookup-max", type=int, default=3, metavar="N",
                   help="longest suffix matched (tokens)")
    s.add_argument("--prompt-lookup-min", type=int, default=1, metavar="N",
                   help="shortest suffix matched (tokens)")
    s.add_argument("--speculative-disable-batch-size", type=int, default=None, metavar="N",
                   help="propose nothing in a step while at least N requests run (large "
                        "batches pay more for the verified rows than they save)")


def engine_args_from_cli(ns: Any) -> EngineArgs:
    names = {f for f in EngineArgs.__dataclass_fields__}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    if getattr(ns, "preset", None):
        kw["model"], kw["load_format"] = ns.preset, "dummy"
    return EngineArgs(**kw)
