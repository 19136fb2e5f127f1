"""Convert a llama-architecture GGUF file into a Hugging Face folder (safetensors + config.json).

The engine loads Hugging Face folders only; GGUF is an import format. Every tensor is
dequantized (the engine re-quantizes with its own methods if asked), llama.cpp's rope row
permutation of q/k is undone, and names are mapped to LlamaForCausalLM's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from kestrel.config import ModelConfig

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor stem -> Hugging Face module path inside model.layers.N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def read_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open a GGUF file; a truncated or corrupt one raises ValueError naming it (and the tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, struct errors
        tensor = _first_tensor_past_eof(path)
        where = f" (tensor {tensor!r} extends past the end of the file)" if tensor else ""
        raise ValueError(f"{path}: truncated or corrupt GGUF file{where}: {exc}") from exc


class _HeaderOnlyReader(GGUFReader):
    """Parses the header and tensor infos but maps no tensor data, to diagnose truncation."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        self.kestrel_tensor_infos = (start_offs, fields)
        self.tensors = []


def _first_tensor_past_eof(path: Path) -> str | None:
    """Best effort: the name of the first tensor whose bytes lie beyond the end of the file."""
    try:
        start, fields = _HeaderOnlyReader(path).kestrel_tensor_infos
        size = path.stat().st_size
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            n_bytes = int(np.prod(dims)) * type_size // block
            if start + int(offset[0]) + n_bytes > size:
                return bytes(name).decode("utf-8", errors="replace")
    # A broken header (or a gguf version whose reader internals differ): name only the file.
    except (ValueError, KeyError, IndexError, OSError, AttributeError, TypeError):
        return None
    return None


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as a Python object (str, int, float, bool or list), or default."""
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def hf_name(gguf_name: str) -> str:
    """The Hugging Face LlamaForCausalLM parameter name of a GGUF tensor name."""
    if m := _LAYER_RE.match(gguf_name):
        layer, stem, kind = m.groups()
        if stem in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[stem]}.{kind}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError("GGUF rope_freqs (llama3-style rope scaling) is not supported yet")
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation of q_proj/k_proj rows (weight or bias).

    llama.cpp stores each head's rows interleaved (pairs of rotary halves next to each other,
    GPT-J style); Hugging Face keeps the first half of the head's rows, then the second half.
    Its permute views rows as [n_head, 2, head_dim/2] and swaps the last two axes; the inverse
    views them as [n_head, head_dim/2, 2] and swaps back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in Hugging Face (row-major [out, in]) shape."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    if qtype == GGMLQuantizationType.F64:
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        arr = dequantize(t.data, qtype)
    shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims innermost first
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
    # F32 data comes back as a view of the read-only memory map: copy it before torch wraps it.
    return arr if arr.flags.writeable else arr.copy()


def hf_config_from_gguf(reader: GGUFReader, tie_word_embeddings: bool,
                        qkv_bias: bool = False) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the GGUF `<arch>.*` and `tokenizer.ggml.*` keys."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                         f"{SUPPORTED_GGUF_ARCHITECTURES}")

    def need(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    eos = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias=qkv_bias,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )
    return cfg.to_hf()


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """Linear rope scaling maps to HF; other kinds would silently change the model, so refuse."""
    kind = gguf_field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = gguf_field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported")


def _convert_tensors(reader: GGUFReader, path: Path, dtype: torch.dtype, progress: bool,
                     ) -> dict[str, torch.Tensor]:
    """Dequantize, un-permute q/k and rename every tensor; errors name the file and tensor."""
    arch = gguf_field(reader, "general.architecture")
    n_head = int(gguf_field(reader, f"{arch}.attention.head_count", 0))
    n_kv = int(gguf_field(reader, f"{arch}.attention.head_count_kv", n_head))
    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor",
                  disable=not progress):
        name = hf_name(t.name)
        try:
            arr = dequantize_tensor(t)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read tensor {t.name!r} "
                             f"({t.tensor_type.name}): {exc}") from exc
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: tensor {t.name!r} holds NaN or inf: corrupt file?")
        w = torch.from_numpy(arr)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, n_head)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, n_kv)
        out[name] = w.to(dtype).contiguous()
    if "model.embed_tokens.weight" not in out:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    return out


def gguf_to_hf_folder(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Write out_dir/{model.safetensors, config.json, tokenizer files} from a llama GGUF.

    float32 is the default because dequantized Q4_1 values (scale * q + min) are not exact
    in fp16/bf16. The folder appears atomically: everything is written to a temporary sibling
    that is renamed into place, so a crash never leaves a half-written folder behind.
    """
    from kestrel.loader.tokenizer import save_gguf_tokenizer  # tokenizer.py imports this module

    path, out = Path(gguf_path), Path(out_dir)
    reader = read_gguf(path)
    names = {t.name for t in reader.tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder is an ordinary one
        # Metadata and tokenizer first: they fail fast, before minutes of dequantizing.
        cfg = hf_config_from_gguf(reader, tie_word_embeddings="output.weight" not in names,
                                  qkv_bias="blk.0.attn_q.bias" in names)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_gguf_tokenizer(reader, tmp)
        tensors = _convert_tensors(reader, path, dtype, progress)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        _replace_dir(tmp, out)
    except ValueError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst; an existing dst is moved aside first (directories cannot be replaced)."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
