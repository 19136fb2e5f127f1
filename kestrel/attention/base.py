"""The attention seam: how a flat batch of tokens meets the paged KV cache.

KV cache layout (one pair per layer), shared by every backend and kernel:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token at position p of a sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``; its flat slot is ``block_id * block_size + offset`` (``slot_mapping``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kestrel.quant.fp8_ops import FP8_DTYPE, cast_fp8


@dataclass
class AttentionMetadata:
    """Per-step description of the flat batch, built once by the model runner.

    Sequences are laid end to end in the flat token dimension T. Sequence i owns query
    tokens ``query_start_loc[i]:query_start_loc[i+1]``; its context after this step is
    ``seq_lens[i]`` tokens, so its first new token sits at position
    ``seq_lens[i] - (query_start_loc[i+1] - query_start_loc[i])``.
    """

    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token (-1: skip)
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    seq_lens_cpu: list[int] | None = None  # host copies, so backends need not synchronise
    query_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class KeptRows:
    """The rows of a flat batch whose output is read past the model's last attention
    (LlamaForCausalLM.forward's ``keep``: the logits rows). When each is the last row of its
    sequence (no prompt logprobs wanted), ``seqs`` names those sequences, in the rows' order,
    on the device and the host: such a row's causal context is its whole sequence, so decode
    attention computes it."""

    rows: torch.Tensor  # [N] int64 indices into the flat batch
    seqs: torch.Tensor | None = None  # [N] int64 sequence indices, or None
    seqs_cpu: list[int] | None = None


class AttentionBackend(ABC):
    """Rotates q and k, writes new K/V into the paged cache and computes causal attention for a
    flat batch.

    Contract: ``forward(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], k_cache, v_cache, meta,
    positions=[T], cos_sin=[max_pos, D])`` first applies the rotary embedding to q and k
    exactly as ``apply_rotary_ref(q, k, positions, cos_sin)`` (possibly in place on q and k),
    then writes the rotated k and v at ``meta.slot_mapping``, and returns ``[T, Hq, D]``: for
    each query token, softmax(q·Kᵀ·scale) over the sequence's cached tokens at positions ≤ its
    own position (new tokens included), times V. GQA: query head h reads KV head
    ``h // (Hq // Hkv)``. The rotary sits behind the seam so a backend may fuse it with the
    cache write; the model never knows whether it does.

    An FP8 cache (``float8_e4m3fn``) holds ``quantize_kv(k, k_scale)`` and ``quantize_kv(v,
    v_scale)``, per-KV-head float32 scales of this layer (``k_scale``, ``v_scale`` [Hkv], set by
    the model runner's calibration); attention sees ``cached · scale`` (the reference
    dequantizes to q's dtype; the Triton kernels apply the scales to q·k and the output).
    """

    name: str = "base"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not divisible by num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale: torch.Tensor | None = None  # [Hkv] float32, FP8 caches only
        self.v_scale: torch.Tensor | None = None

    @classmethod
    def decode_len_breaks(cls, num_seqs: int) -> tuple[int, ...]:
        """Longest-context bounds at which this backend's decode path for ``num_seqs``
        sequences changes (it reads ``meta.max_seq_len``): a CUDA graph captured for one range
        must not replay for another, so the graphs come one per range. Default: none."""
        return ()

    def kv_scales(self, k_cache: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This layer's (k_scale, v_scale) for an FP8 cache, else (None, None)."""
        if k_cache.dtype != FP8_DTYPE:
            return None, None
        if self.k_scale is None or self.v_scale is None:
            raise RuntimeError("an FP8 KV cache needs calibrated scales (ModelRunner."
                               "calibrate_kv_scales) before the first forward")
        return self.k_scale, self.v_scale

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor: ...

    def forward_kept(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     keep: KeptRows, *, positions: torch.Tensor,
                     cos_sin: torch.Tensor) -> torch.Tensor:
        """As ``forward`` (every row's K/V cached), but the output holds only the kept rows,
        [N, Hq, D], row i being ``keep.rows[i]``'s. Here: every row, then the kept ones; a
        backend may compute less."""
        out = self.forward(q, k, v, k_cache, v_cache, meta, positions=positions,
                           cos_sin=cos_sin)
        return out.index_select(0, keep.rows)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """K or V [..., Hkv, D] → FP8: x / scale[head] in float32, saturated to ±448."""
    return cast_fp8(x.float() / scale[:, None])


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 K or V [..., Hkv, D] → ``dtype``: x · scale[head] in float32, rounded once."""
    return (x.float() * scale[:, None]).to(dtype)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Reference scatter of new K/V [T, Hkv, D] into the paged cache at ``slot_mapping``
    (quantized with the per-head scales when the cache is FP8)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if k_cache.dtype == FP8_DTYPE:
        k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


_BACKENDS: dict[str, type[AttentionBackend]] = {}
# The built-in backends' modules, imported (so registered) when first named: a user's
# ``--attention-backend torch`` must not depend on what else happened to import them.
_BUILTIN = {"torch": "kestrel.attention.torch_ref", "triton": "kestrel.attention.triton_backend"}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend_cls(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_BUILTIN))
        raise ValueError(f"unknown attention backend {name!r}; known: {known}")
    return _BACKENDS[name]
