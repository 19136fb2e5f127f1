"""Frozen, validated configuration objects. Built once at start-up, never mutated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family decoder (read from a Hugging Face config.json)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config.json dict (transformers 4 or 5 spelling) to a ModelConfig."""
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = rope if rope_type not in (None, "default") else None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads for the same architecture."""
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1
            else self.eos_token_id[0],
        }
        if self.architecture == "LlamaForCausalLM":
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = False
        return cfg

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_hidden_layers * per_layer + v * h + head + h


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how much memory the pool may take."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory for weights + activations + KV
    cpu_kv_cache_bytes: int = 1 << 30  # KV pool size on CPU
    num_blocks: int | None = None  # explicit override (tests force preemption with a tiny pool)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # the model dtype, or "fp8" (e4m3, per-KV-head scales)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; "
                             f"use one of {list(KV_CACHE_DTYPES)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 = fp8_e4m3 (float8_e4m3fn)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens and sequences per step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority"
    max_waiting: int | None = None  # bounded waiting queue (server answers 503 past it)
    # > 0: no request computes more prompt tokens than this in one step, so one long prompt
    # leaves the rest of the budget to others and keeps each step short (vLLM's option)
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got "
                             f"{self.long_prefill_token_threshold}")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold needs chunked prefill")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    custom_all_reduce: bool = True  # CUDA TP: symmetric-memory one-shot for small all-reduces
    pipeline_micro_batches: int | None = None  # PP: micro-batches in flight; None: pp + 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        mb = self.pipeline_micro_batches
        if mb is not None and mb < self.pipeline_parallel_size:
            raise ValueError(f"pipeline_micro_batches ({mb}) must be at least "
                             f"pipeline_parallel_size ({self.pipeline_parallel_size}): fewer "
                             f"micro-batches than stages leave a stage idle by construction")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: ``method`` None (off) or "ngram" (prompt lookup); each decoding
    request's step carries up to ``num_speculative_tokens`` proposals for the target to verify;
    n-gram proposals match the last ``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens.
    ``disable_batch_size``: no proposals in a step while at least that many requests run (a
    batch large enough to use the GPU's compute pays more for the extra rows than it saves)."""

    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    disable_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram"):
            raise ValueError(f"speculative method must be 'ngram' (or none), got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if self.disable_batch_size is not None and self.disable_batch_size < 1:
            raise ValueError(f"speculative disable_batch_size must be >= 1, got "
                             f"{self.disable_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")


@dataclass(frozen=True)
class QuantConfig:
    """Which quantization method, and the knobs of the FP8 recipe."""

    method: str | None = None  # None, "fp8", "fp8-tensor", "int8", "gptq", ...
    fp8_activation_scale_ub: float = 1200.0
    fp8_attention: bool = False
    fp8_skip_layers: bool = True
    # FP8 GEMMs through torch._scaled_mm (above fp8_ops.SMALL_M_MAX rows: prefill, large
    # decode batches) accumulate at the tensor cores' own precision instead of promoting
    # partial sums to float32: fbgemm's default for Llama 3, and no measurable quality cost on
    # the default model (docs/QUANTIZATION.md)
    fp8_fast_accum: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    model_config: ModelConfig
    tokenizer: str | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    attention_backend: str = "auto"
    enforce_eager: bool = False
    debug_checks: bool = False  # verify block-pool invariants whenever the engine goes idle
    # Overlap the host work of step N+1 with the device running step N (None: on for CUDA).
    async_scheduling: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.speculative.method is not None and self.parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative decoding runs without pipeline parallelism "
                             "(pipeline_parallel_size 1)")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def overlap_steps(self) -> bool:
        if self.speculative.method is not None:
            return False  # a verified step's accepted count decides where the next one starts
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.device.startswith("cuda")


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16 or AMX)? Then ``--dtype bfloat16``
    runs the CPU path much faster than float32 (2 threads of an AMD EPYC with AVX512-BF16, the
    default model: batch-1 decode 1.65x, a 128-token prefill 2.2x; docs/PERFORMANCE.md)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' means bfloat16 on CUDA and float32 on CPU: the CPU path is the exact reference
    (transformers' logits to the last bit), and bf16 matmuls are slow on CPUs without
    ``cpu_has_native_bf16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(table)}")
    return table[dtype]
