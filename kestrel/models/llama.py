"""One Llama-family decoder for Llama 2/3/3.1, Mistral, Qwen2 and SmolLM2: families differ by config.

The model sees a flat batch: token ids [T], positions [T], the per-layer paged KV cache and the
attention metadata. It knows nothing about requests. With pipeline parallelism a model instance
holds only its stage's decoder layers (embedding on the first stage, norm and LM head on the last).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from kestrel.attention.base import AttentionBackend, AttentionMetadata, KeptRows
from kestrel.config import ModelConfig, QuantConfig
from kestrel.layers.activation import silu_and_mul_ref
from kestrel.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kestrel.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    gate_up_swiglu,
    swiglu_skinny,
)
from kestrel.layers.norm import RMSNorm
from kestrel.layers.rotary import RotaryEmbedding
from kestrel.parallel.state import SINGLE, TPGroup
from kestrel.quant.base import LayerPlace, get_quant_method

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype, quant: QuantConfig,
                 tp: TPGroup, backend_cls: type[AttentionBackend],
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        prefix = f"model.layers.{idx}.self_attn"
        qm = lambda name: get_quant_method(
            quant, LayerPlace(f"{prefix}.{name}", idx, cfg.num_hidden_layers))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, dtype,
                                          qm("qkv_proj"), tp)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, False, dtype, qm("o_proj"), tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.rotary = rotary  # one table shared by every layer
        self.attn = backend_cls(self.num_heads, self.num_kv_heads, self.head_dim,
                                self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv: KVCache,
                meta: AttentionMetadata, keep: KeptRows | None = None) -> torch.Tensor:
        """x [T, H] → [T, H]; with ``keep``, every row's K/V is cached, but only the kept
        rows are attended for and go through o_proj: [N, H]."""
        qkv = self.qkv_proj(x)  # [T, q + 2kv]; x may be an QuantInput (fp8_fused.fp8_norm_input)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = qkv.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # The backend applies the rotary (fused with its cache write where it can).
        if keep is None:
            out = self.attn.forward(q, k, v, kv[0], kv[1], meta, positions=positions,
                                    cos_sin=self.rotary.cos_sin)
        else:
            out = self.attn.forward_kept(q, k, v, kv[0], kv[1], meta, keep,
                                         positions=positions, cos_sin=self.rotary.cos_sin)
        return self.o_proj(out.reshape(out.shape[0], self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype, quant: QuantConfig,
                 tp: TPGroup) -> None:
        super().__init__()
        prefix = f"model.layers.{idx}.mlp"
        n = cfg.num_hidden_layers
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype,
            get_quant_method(quant, LayerPlace(f"{prefix}.gate_up_proj", idx, n)), tp)
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, False, dtype,
            get_quant_method(quant, LayerPlace(f"{prefix}.down_proj", idx, n)), tp)
        self.act = silu_and_mul_ref
        # Set by the kernel registry: try the paths with the activation inside a GEMM
        # (swiglu_skinny for a few rows, gate_up_swiglu for many).
        self.fold_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_act:
            y = swiglu_skinny(self.gate_up_proj, self.down_proj, x)
            if y is not None:
                return y
            h = gate_up_swiglu(self.gate_up_proj, x)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(self.act(self.gate_up_proj(x)))


def norm_input_ref(norm: RMSNorm, layer: nn.Module, x: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) → norm → (the input of ``layer``, new residual); with no residual (the
    first layer) the new residual is x. use_triton_kernels may swap in a version that hands an
    FP8 layer its input quantized (kestrel.quant.fp8_fused.fp8_norm_input)."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


def norm_mlp_ref(norm: RMSNorm, mlp: LlamaMLP, x: torch.Tensor,
                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """post_attention_layernorm, then the MLP. use_triton_kernels may swap in a fused version
    whose producers emit FP8 (kestrel.quant.fp8_fused.fp8_norm_mlp)."""
    x, residual = norm(x, residual)
    return mlp(x), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, dtype: torch.dtype, quant: QuantConfig,
                 tp: TPGroup, backend_cls: type[AttentionBackend],
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, idx, dtype, quant, tp, backend_cls, rotary)
        self.mlp = LlamaMLP(cfg, idx, dtype, quant, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # the kernel registry may swap in fused versions of these two
        self.norm_input, self.norm_mlp = norm_input_ref, norm_mlp_ref

    def forward(self, positions, x, residual, kv: KVCache, meta: AttentionMetadata,
                keep: KeptRows | None = None):
        """``keep``: only these rows go on after attention (LlamaForCausalLM.forward)."""
        x, residual = self.norm_input(self.input_layernorm, self.self_attn.qkv_proj, x, residual)
        x = self.self_attn(positions, x, kv, meta, keep)
        if keep is not None:
            residual = residual.index_select(0, keep.rows)
            if keep.rows.numel() == 0:  # nothing is read (a prompt's middle chunk): skip the MLP
                return x, residual
        return self.norm_mlp(self.post_attention_layernorm, self.mlp, x, residual)


class LlamaForCausalLM(nn.Module):
    """Decoder layers ``layer_range`` of the model; first/last stage own embedding/head."""

    # checkpoint name → (our fused parameter name, shard id)
    STACKED = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"),
               ("v_proj", "qkv_proj", "v"), ("gate_proj", "gate_up_proj", 0),
               ("up_proj", "gate_up_proj", 1))

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, backend_cls: type[AttentionBackend],
                 quant: QuantConfig | None = None, tp: TPGroup = SINGLE,
                 layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        quant = quant or QuantConfig()
        self.cfg = cfg
        self.start, self.end = layer_range or (0, cfg.num_hidden_layers)
        # (layer, "k" | "v") → the checkpoint's FP8 KV cache scale, if it has them
        self.checkpoint_kv_scales: dict[tuple[int, str], float] = {}
        self.is_first = self.start == 0
        self.is_last = self.end == cfg.num_hidden_layers
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
                             if self.is_first or (self.is_last and cfg.tie_word_embeddings)
                             else None)
        # [max_pos, head_dim] float32: 2 GiB for a 131k-position model if each layer had its own
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                 cfg.rope_scaling)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(cfg, i, dtype, quant, tp, backend_cls, rotary)
            for i in range(self.start, self.end)
        })
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(
                cfg.vocab_size, cfg.hidden_size, dtype, tp)
        if tp.size > 1:
            self._sum_in_norms(tp)

    def _sum_in_norms(self, tp: TPGroup) -> None:
        """Move each row-parallel output's all-reduce into the RMSNorm that takes it next
        (o_proj → post_attention_layernorm, down_proj → the next layer's input_layernorm or the
        final norm), where one kernel can sum, add the residual and normalise
        (TPGroup.all_reduce_rms_norm). A stage's last down_proj keeps its all-reduce unless
        the final norm follows: the next stage receives summed hidden states."""
        layers = list(self.layers.values())
        for i, layer in enumerate(layers):
            nxt = (layers[i + 1].input_layernorm if i + 1 < len(layers)
                   else self.norm if self.is_last else None)
            for linear, norm in ((layer.self_attn.o_proj, layer.post_attention_layernorm),
                                 (layer.mlp.down_proj, nxt)):
                if norm is not None and linear.bias is None:
                    linear.reduce_results = False
                    norm.reduce_input = tp

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, hidden: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, keep: KeptRows | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this stage. First stage embeds ``input_ids``; later ones continue ``hidden``.

        Returns (hidden [T, H], residual [T, H]); the last stage returns final-normed hidden
        states and residual None. ``keep`` (the last stage only; other stages ignore it): the
        rows whose output is read (the logits rows). The last layer still caches every row's
        K/V, but attends, and runs o_proj, its MLP and the final norm, for the kept rows only
        and returns [N, H], row i being keep.rows[i]'s: a 4k-token prefill that samples one
        token skips 4,095 rows of one layer's o_proj and MLP (2.8% of the linear work on an
        8B) and, where the backend can (AttentionBackend.forward_kept), of its attention.
        """
        if self.is_first:
            hidden = self.embed_tokens(input_ids)
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers.values()):
            prune = keep if self.is_last and j == last else None
            hidden, residual = layer(positions, hidden, residual, kv_caches[j], meta, prune)
        if self.is_last:
            if hidden.shape[0]:  # no kept row (a middle chunk): nothing to normalise
                hidden, _ = self.norm(hidden, residual)
            return hidden, None
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] → [N, vocab] float32 logits."""
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        return ParallelLMHead.compute_logits(head, hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs in Hugging Face naming; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        self.checkpoint_kv_scales.clear()
        for name, tensor in weights:
            if self._take_kv_scale(name, tensor):
                continue
            target = self._map_name(name)
            if target is None:
                continue
            pname, shard = target
            if pname not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            param = params[pname]
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    self._copy_plain(param, tensor, name)
                else:
                    loader(param, tensor, shard) if shard is not None else loader(param, tensor)
            except (ValueError, RuntimeError, IndexError) as e:  # narrow/copy on a bad shape
                raise ValueError(f"checkpoint tensor {name!r} "
                                 f"(shape {tuple(tensor.shape)}): {e}") from None
            loaded.add(pname)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing tensors for {missing[:5]}"
                             f"{' and more' if len(missing) > 5 else ''}")
        for module in self.modules():
            qm = getattr(module, "quant_method", None)
            if qm is not None:
                qm.process_weights_after_loading(module)

    # FP8 KV cache scales as FP8 checkpoints store them (one per layer for K, one for V):
    # vLLM's ``self_attn.k_scale`` and compressed-tensors' ``self_attn.k_proj.output_scale``.
    KV_SCALE_SUFFIXES: ClassVar[dict[str, str]] = {".self_attn.k_scale": "k", ".self_attn.v_scale": "v",
                                                    ".self_attn.k_proj.output_scale": "k",
                                                    ".self_attn.v_proj.output_scale": "v"}

    def _take_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep a checkpoint's KV cache scale (``checkpoint_kv_scales``, every layer's, so each
        pipeline stage sees whether all are there; an FP8 cache uses them instead of
        calibrating); True if ``name`` is one."""
        which = next((w for sfx, w in self.KV_SCALE_SUFFIXES.items() if name.endswith(sfx)),
                     None)
        if which is None:
            return False
        value = tensor.float().reshape(-1)
        if value.numel() != 1 or not bool(torch.isfinite(value).all()) or value.item() <= 0:
            raise ValueError(f"checkpoint tensor {name!r}: a KV cache scale must be one "
                             f"positive finite number, got {value.tolist()[:4]}")
        self.checkpoint_kv_scales[(int(name.split(".")[2]), which)] = value.item()
        return True

    def _map_name(self, name: str) -> tuple[str, object] | None:
        """HF name → (our parameter name, shard id), or None for tensors this stage skips."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name.startswith("lm_head."):
            if self.cfg.tie_word_embeddings or not self.is_last:
                return None
            return name, None
        if name.startswith("model.embed_tokens."):
            return (name[len("model."):], None) if self.embed_tokens is not None else None
        if name.startswith("model.norm."):
            return (name[len("model."):], None) if self.is_last else None
        if not name.startswith("model.layers."):
            raise ValueError(f"unexpected checkpoint tensor {name!r}")
        idx = int(name.split(".")[2])
        if not self.start <= idx < self.end:
            return None
        name = name[len("model."):]
        for ckpt, ours, shard in self.STACKED:
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{ours}."), shard
        return name, None

    @staticmethod
    def _copy_plain(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(tensor)
