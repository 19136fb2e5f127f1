"""FP8 KV cache (``kv_cache_dtype="fp8"``): calibrated per-layer, per-KV-head scales, half the
cache bytes, and quality close to the model-dtype cache on the real default model."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM, SamplingParams
from kestrel.engine.args import EngineArgs
from kestrel.eval.perplexity import corpus_ids, token_windows
from kestrel.quant.fp8_ops import FP8_DTYPE
from tests.helpers import prompt_logits
from tests.parallel.common import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_llm(default_model_path):
    return LLM(str(default_model_path), dtype="float32", device="cpu", debug_checks=True,
               kv_cache_dtype="fp8")


def _layers(llm: LLM):
    return list(llm.engine.executor.runner.model.layers.values())


def test_cache_is_fp8_with_calibrated_per_head_scales(fp8_llm, smollm_llm):
    runner, ref = fp8_llm.engine.executor.runner, smollm_llm.engine.executor.runner
    assert runner.kv_dtype() == FP8_DTYPE
    assert all(k.dtype == v.dtype == FP8_DTYPE for k, v in runner.kv_caches)
    assert runner.block_bytes() * 4 == ref.block_bytes()  # fp8 vs float32 caches
    hkv = runner.kv_caches[0][0].shape[2]
    scales = torch.stack([torch.stack([layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale])
                          for layer in _layers(fp8_llm)])  # [layers, 2, Hkv]
    assert scales.shape == (len(_layers(fp8_llm)), 2, hkv)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert len(set(scales.flatten().tolist())) > scales.numel() // 2  # per layer, head, K/V
    assert all(layer.self_attn.attn.k_scale is None for layer in _layers(smollm_llm))


def test_quality_close_to_the_float_cache(fp8_llm, smollm_llm):
    """Prompt logits of real text (pydoc windows) through both caches: small KL, top-1 mostly
    unchanged. (`kestrel eval compare --kv-cache-dtype fp8` on 64 windows: KL 0.0085 nats,
    94.9% agreement, perplexity +0.45%.)"""
    ids = corpus_ids(smollm_llm.engine.tokenizer)
    kls, agree, total = [], 0, 0
    for window in token_windows(ids, 96, 4):
        want = torch.log_softmax(prompt_logits(smollm_llm, window).double(), -1)
        got = torch.log_softmax(prompt_logits(fp8_llm, window).double(), -1)
        kls.append(float((want.exp() * (want - got)).sum(-1).mean()))
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        total += want.shape[0]
    assert sum(kls) / len(kls) < 0.03
    assert agree / total > 0.9


def test_prefix_cache_hits_reuse_fp8_blocks(fp8_llm):
    """A repeated prompt reads its prefix from FP8 blocks written by the first one and
    continues exactly as it did."""
    prompt = {"prompt_token_ids": list(range(5, 70))}
    first = fp8_llm.generate([prompt], GREEDY)[0]
    second = fp8_llm.generate([prompt], GREEDY)[0]
    assert second.num_cached_tokens >= 64 - fp8_llm.engine.cfg.cache.block_size
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_ranks_calibrate_like_one_process(tmp_path, tp, pp):
    """TP=2: every rank calibrates its own KV heads in the same forward; PP=2: the calibration
    prefill runs as one micro-batch through the stages, each calibrating its own layers. Both
    give one FP8-cache process's greedy tokens (real processes, gloo)."""
    path = str(make_tiny_checkpoint(tmp_path / "tiny4"))
    prompts = [{"prompt_token_ids": [1 + (7 * i + j) % 500 for j in range(3 + 11 * i)]}
               for i in range(4)]
    one = LLM(path, kv_cache_dtype="fp8", num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    llm = LLM(path, kv_cache_dtype="fp8", num_kv_blocks=64, tensor_parallel_size=tp,
              pipeline_parallel_size=pp)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
        stage0 = llm.engine.executor.stage.runner.model.layers.values()
        scales0 = [layer.self_attn.attn.k_scale for layer in stage0]
        assert all(s is not None for s in scales0)
        ref = [layer.self_attn.attn.k_scale for layer in _layers(one)][:len(scales0)]
        if tp == 1:  # stage 0 holds the first layers whole: the same scales as one process
            assert all(torch.allclose(a, b) for a, b in zip(scales0, ref))
    finally:
        llm.engine.executor.shutdown()


def test_unsupported_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not supported"):
        EngineArgs(model="tiny-llama", load_format="dummy",
                   kv_cache_dtype="int8").create_config()


def _with_kv_scales(folder, names: dict[str, float]):
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors.update({n: torch.tensor(v) for n, v in names.items()})
    save_file(tensors, f, metadata={"format": "pt"})
    return str(folder)


def test_checkpoint_kv_scales_replace_calibration(tmp_path):
    """A checkpoint's per-layer scales (vLLM's self_attn.k_scale, or compressed-tensors'
    k_proj.output_scale) are used as they are, for every head; a model-dtype cache ignores
    them; missing layers, or a scale that is not one positive number, are refused."""
    folder = make_tiny_checkpoint(tmp_path / "tiny4")
    names = {}
    for i in range(4):
        k_name = f"model.layers.{i}.self_attn.k_scale" if i % 2 else \
            f"model.layers.{i}.self_attn.k_proj.output_scale"
        names[k_name] = 0.01 * (i + 1)
        names[f"model.layers.{i}.self_attn.v_scale"] = 0.02 * (i + 1)
    path = _with_kv_scales(folder, names)
    llm = LLM(path, kv_cache_dtype="fp8", num_kv_blocks=64)
    for i, layer in enumerate(_layers(llm)):
        attn = layer.self_attn.attn
        assert torch.equal(attn.k_scale, torch.full((attn.num_kv_heads,), 0.01 * (i + 1)))
        assert torch.equal(attn.v_scale, torch.full((attn.num_kv_heads,), 0.02 * (i + 1)))
    assert len(llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)[0].outputs[0]
               .token_ids) == GREEDY.max_tokens
    plain = LLM(path, num_kv_blocks=64)
    assert all(layer.self_attn.attn.k_scale is None for layer in _layers(plain))
    del names["model.layers.2.self_attn.v_scale"]
    partial = make_tiny_checkpoint(tmp_path / "partial")
    with pytest.raises(ValueError, match="not for layer 2"):
        LLM(_with_kv_scales(partial, names), kv_cache_dtype="fp8", num_kv_blocks=64)
    bad = make_tiny_checkpoint(tmp_path / "bad")
    with pytest.raises(ValueError, match="one positive finite number"):
        LLM(_with_kv_scales(bad, {"model.layers.0.self_attn.k_scale": -1.0}), num_kv_blocks=64)
