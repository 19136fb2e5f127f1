"""Offline calibration shared by the quantizers that look at activations (GPTQ, SmoothQuant,
Wanda's 2:4 pruning): text windows, the float model on the CPU, and a pass over it block by
block that collects statistics of the decoder linears' inputs and lets the caller change each
block before the next one sees its output."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

# the decoder linears of a block, by their names in our (fused) model
DECODER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

# an input statistic: (accumulator or None at the first call, inputs [T, K]) → accumulator
Stat = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def calibration_windows(src: Path, windows: int, window: int) -> list[list[int]]:
    """``windows`` windows of ``window`` tokens from the end of the pydoc text (evaluations
    read it from the start)."""
    from kestrel.eval.perplexity import corpus_ids
    from kestrel.loader.tokenizer import load_tokenizer  # needs gguf: only for text

    src = Path(src)
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model): the "
                         "calibration text cannot be tokenized for it")
    ids = corpus_ids(load_tokenizer(src))
    if len(ids) < windows * window:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than "
                         f"{windows} × {window}")
    return [ids[len(ids) - (i + 1) * window: len(ids) - i * window] for i in range(windows)]


def load_float_model(src: Path):
    """The folder's model in float32 on the CPU, with the torch reference attention."""
    import kestrel.attention.torch_ref  # noqa: F401 - registers the "torch" backend
    from kestrel.attention.base import get_backend_cls
    from kestrel.loader.hf import iterate_weights, load_model_config
    from kestrel.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(load_model_config(src), torch.float32, get_backend_cls("torch"))
    model.load_weights(iterate_weights(src))
    return model


def block_forward(cfg, layer, x: torch.Tensor, residual: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder block over one calibration window (one sequence, a fresh cache): the
    (hidden, residual) pair the next block takes."""
    from kestrel.attention.base import AttentionMetadata

    t = x.shape[0]
    nb = -(-t // 16)
    kv = tuple(torch.zeros(nb, 16, cfg.num_key_value_heads, cfg.head_dim) for _ in range(2))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t), query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.arange(nb, dtype=torch.int32)[None], max_query_len=t,
        max_seq_len=t, seq_lens_cpu=[t], query_lens_cpu=[t])
    return layer(torch.arange(t), x, residual, kv, meta)


@torch.no_grad()
def calibrated_blocks(model, windows: list[list[int]], names: tuple[str, ...], stat: Stat
                      ) -> Iterator[tuple[str, nn.Module, list[tuple[nn.Module, torch.Tensor]]]]:
    """For each decoder block in order: run the ``windows`` (token ids) through it with
    ``stat`` accumulating the inputs of each linear in ``names``, then yield (block index,
    block, [(linear, its statistic)]). The caller may change the block; the windows go on to
    the next block through the block as changed (GPTQ's sequential quantization)."""
    run = functools.partial(block_forward, model.cfg)
    states = [(model.embed_tokens(torch.tensor(ids)), None) for ids in windows]
    for idx, layer in model.layers.items():
        lins = [layer.get_submodule(n) for n in names]
        acc: list[torch.Tensor | None] = [None] * len(lins)

        def hook(i: int, _module, args) -> None:
            acc[i] = stat(acc[i], args[0].reshape(-1, args[0].shape[-1]))  # noqa: B023

        handles = [lin.register_forward_pre_hook(functools.partial(hook, i))
                   for i, lin in enumerate(lins)]
        try:
            for x, residual in states:
                run(layer, x, residual)
        finally:
            for h in handles:
                h.remove()
        yield idx, layer, list(zip(lins, acc))
        states = [run(layer, x, residual) for x, residual in states]


def hf_parts(name: str, lin) -> list[tuple[str, slice]]:
    """Our fused module → the checkpoint modules it holds, with their output rows."""
    head, _, last = name.rpartition(".")
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    if last not in parts:
        return [(name, slice(None))]
    sizes, start, res = lin.output_sizes, 0, []
    for part, size in zip(parts[last], sizes):
        res.append((f"{head}.{part}", slice(start, start + size)))
        start += size
    return res
