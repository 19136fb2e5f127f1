"""The README's main commands work as a user runs them: a real `kestrel` process."""

from __future__ import annotations

import json
import subprocess
import sys


def _kestrel(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kestrel.cli", "--log-level", "WARNING", *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_on_default_model(default_model_path):
    r = _kestrel("generate", "The capital of France is", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "finish=length" in r.stderr or "finish=stop" in r.stderr


def test_generate_with_structured_output(default_model_path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["city"], "additionalProperties": false, '
                      '"properties": {"city": {"enum": ["Paris", "Rome"]}}}')
    r = _kestrel("generate", "The capital of France as JSON:", "--json-schema", str(schema),
                 "--max-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) in ({"city": "Paris"}, {"city": "Rome"}), r.stdout
    r = _kestrel("generate", "Yes or no?", "--choice", "yes", "--choice", "no",
                 "--temperature", "1", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no"), r.stderr
    r = _kestrel("generate", "hi", "--regex", "(unclosed")
    assert r.returncode != 0 and "invalid regex" in r.stderr and "Traceback" not in r.stderr


def test_chat_streams_a_reply(default_model_path):
    r = _kestrel("chat", "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_argument_is_a_clear_error():
    r = _kestrel("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2
    assert "not found" in r.stderr and "Traceback" not in r.stderr


def test_quantize_writes_folders_the_engine_loads(tmp_path):
    """`kestrel quantize --method fp8|rtn|sparse24 MODEL OUT` on a float folder: the fbgemm_fp8,
    GPTQ and 2:4 layouts in config.json, and each folder generates; a group size that does not
    divide the features, a calibrated method without a tokenizer or a bad alpha are clear
    errors."""
    import json

    from kestrel import LLM, SamplingParams
    from tests.parallel.common import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "float", layers=2, seed=1)
    for method, extra, want in (("fp8", (), "fbgemm_fp8"),
                                ("rtn", ("--bits", "3", "--group-size", "32"), "gptq"),
                                ("sparse24", ("--sparse-score", "magnitude"),
                                 "compressed-tensors")):
        out = tmp_path / method
        r = _kestrel("quantize", "--method", method, str(src), str(out), *extra)
        assert r.returncode == 0, r.stderr
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == want
        outs = LLM(str(out)).generate([{"prompt_token_ids": [1, 2, 3]}],
                                      SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(outs[0].outputs[0].token_ids) == 4
    r = _kestrel("quantize", "--method", "rtn", "--group-size", "48", str(src),
                 str(tmp_path / "bad"))
    assert r.returncode != 0 and "does not divide" in r.stderr
    # calibrated methods tokenize text: a folder without a tokenizer is refused, as is an
    # alpha outside [0, 1]
    for method, extra, msg in (("gptq", (), "has no tokenizer"),
                               ("smoothquant", (), "has no tokenizer"),
                               ("sparse24", (), "has no tokenizer"),
                               ("smoothquant", ("--alpha", "1.5"), "must be in [0, 1]")):
        r = _kestrel("quantize", "--method", method, str(src), str(tmp_path / "bad2"), *extra)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
