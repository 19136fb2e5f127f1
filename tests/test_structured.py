"""Structured outputs on the real default model: every answer parses and satisfies its
constraint (JSON schema, any JSON object, regex, choice, EBNF grammar), greedy and sampled,
n > 1, beside speculation; bad constraints are refused before anything is queued."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kestrel import LLM, SamplingParams, StructuredOutput
from kestrel.structured import allowed_tokens, constrain_logits

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pet": {"enum": ["cat", "dog", "none"]}}}


def _prompt(llm: LLM, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}],
                                                   tokenize=False, add_generation_prompt=True)


def _texts(llm: LLM, text: str, spec: StructuredOutput, **kw) -> list:
    params = SamplingParams(max_tokens=80, structured=spec, **kw)
    return [o for out in llm.generate([_prompt(llm, text)], params) for o in out.outputs]


def _is_person(value) -> bool:
    return (set(value) == {"name", "age", "pet"} and isinstance(value["name"], str)
            and len(value["name"]) <= 12 and isinstance(value["age"], int)
            and 0 <= value["age"] <= 150 and value["pet"] in ("cat", "dog", "none"))


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "n": 3,
                                                            "seed": 7}])
def test_json_schema_answers_parse_and_fit(smollm_llm, sampling):
    outs = _texts(smollm_llm, "Describe a person as JSON.", StructuredOutput(json=PERSON),
                  **sampling)
    assert len(outs) == sampling.get("n", 1)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert _is_person(json.loads(o.text)), o.text


def test_json_object_regex_choice_and_grammar(smollm_llm):
    (obj,) = _texts(smollm_llm, "Give a JSON object with a key 'greeting'.",
                    StructuredOutput(json_object=True))
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{2}"
    for o in _texts(smollm_llm, "Make up a code.", StructuredOutput(regex=pattern),
                    temperature=1.0, n=3, seed=3):
        assert re.fullmatch(pattern, o.text), o.text
    choices = ("red", "green", 'a "blue" one')
    for o in _texts(smollm_llm, "Pick a color.", StructuredOutput(choice=choices),
                    temperature=1.0, n=4, seed=5):
        assert o.text in choices and o.finish_reason == "stop"
    (g,) = _texts(smollm_llm, "Count.", StructuredOutput(grammar='root ::= ("one" | "two") " "'
                                                          ' ("three" | "four")'))
    assert re.fullmatch(r"(one|two) (three|four)", g.text), g.text


def test_the_grammar_ends_the_text_under_ignore_eos(smollm_llm):
    (o,) = _texts(smollm_llm, "Yes or no?", StructuredOutput(choice=["yes", "no"]),
                  ignore_eos=True)
    assert o.text in ("yes", "no") and o.finish_reason == "stop" and len(o.token_ids) <= 3


def test_a_grammar_with_no_way_forward_ends_its_request(smollm_llm):
    outs = _texts(smollm_llm, "Anything.", StructuredOutput(grammar="root ::= root"),
                  temperature=1.0, n=2, seed=1)
    assert [(o.finish_reason, o.stop_reason, len(o.token_ids)) for o in outs] == \
        [("stop", "grammar", 1)] * 2


def test_bad_constraints_are_refused_and_leave_nothing_queued(smollm_llm):
    engine = smollm_llm.engine
    for spec in (StructuredOutput(regex="(unclosed"), StructuredOutput(grammar="root ::= ("),
                 StructuredOutput(json='{"type": "object", "properties": 3}')):
        with pytest.raises(ValueError, match="structured output: invalid"):
            engine.add_request("bad", "hi", SamplingParams(structured=spec))
        assert not engine.has_unfinished_requests() and "bad" not in engine.groups
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=StructuredOutput(regex="a+"))


def test_structured_requests_beside_speculation(default_model_path, smollm_llm):
    """Prompt lookup proposes for free requests and not for structured ones (their masks need
    each token on the host); both come out as on an engine without speculation."""
    llm = LLM(str(default_model_path), dtype="float32", device="cpu",
              speculative_method="ngram")
    prompt = _prompt(llm, "Repeat: one two three one two three one two three")
    free = SamplingParams(temperature=0, max_tokens=24)
    shaped = SamplingParams(temperature=0, max_tokens=80, structured=StructuredOutput(json=PERSON))
    got = llm.generate([prompt, prompt], [free, shaped])
    want = smollm_llm.generate([prompt, prompt], [free, shaped])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert _is_person(json.loads(got[1].outputs[0].text))
    assert llm.engine.stats.num_draft_tokens > 0


def test_masks_unpack_and_leave_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    v = 70
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), generator=g, dtype=torch.int32)
    want = torch.tensor([[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(v)]
                         for r in range(2)])
    assert torch.equal(allowed_tokens(bitmask, v), want)

    class Fixed:  # a matcher that allows tokens 3 and 5
        def fill(self, bm, row):
            bm[row, 0] = (1 << 3) | (1 << 5)

    logits = torch.randn(3, v, generator=g)
    before = logits.clone()
    out = constrain_logits(logits, [None, Fixed(), None])
    assert torch.equal(logits, before)  # the input is never written
    assert torch.equal(out[[0, 2]], before[[0, 2]])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3, 5]
