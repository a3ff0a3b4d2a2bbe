import json

import numpy as np
import pytest

from reduce.condition import load_condition
from reduce.errors import ReduceError
from reduce.prompts import build_prompts, render, template_fields
from tests.tiny import tiny_text_model

TEMPLATE = """
name = "p"
seed = {seed}
[model]
name = "tiny"
[prompts]
template = "the {{subject}} near the {{place}}"
answer = "{{subject.verb}}"
wrong = "{{subject.wrong}}"
counterfactual = "the {{subject.flip}} near the {{place}}"
{extra}
[prompts.slots]
subject = [ {{ text = "key", verb = "is", wrong = "are", flip = "keys", number = "singular" }},
            {{ text = "keys", verb = "are", wrong = "is", flip = "key", number = "plural" }},
            {{ text = "dog", verb = "is", wrong = "are", flip = "dogs", number = "singular" }} ]
place = ["cabinet", "big table", "box"]
[prompts.labels]
number = "{{subject.number}}"
place = "{{place}}"
[target]
kind = "logit_diff"
"""


def condition(tmp_path, seed=0, extra=""):
    path = tmp_path / f"c{seed}.toml"
    path.write_text(TEMPLATE.format(seed=seed, extra=extra))
    return load_condition(path)


def test_template_product_in_order_with_answers_and_labels(tmp_path):
    prompts = build_prompts(condition(tmp_path))
    assert len(prompts) == 9
    assert prompts.texts[:4] == ("the key near the cabinet", "the key near the big table", "the key near the box", "the keys near the cabinet")
    assert prompts.answers[3] == "are" and prompts.wrongs[3] == "is"
    assert prompts.counterfactuals[3] == "the key near the cabinet"
    assert prompts.labels == {"number": ("singular",) * 3 + ("plural",) * 3 + ("singular",) * 3, "place": ("cabinet", "big table", "box") * 3}
    assert prompts.answer_ids is None  # no model, no token ids


def test_max_prompts_is_a_seeded_sample_kept_in_product_order(tmp_path):
    full = build_prompts(condition(tmp_path)).texts
    first = build_prompts(condition(tmp_path, extra="max_prompts = 4")).texts
    again = build_prompts(condition(tmp_path, extra="max_prompts = 4")).texts
    other = [build_prompts(condition(tmp_path, seed=s, extra="max_prompts = 4")).texts for s in range(1, 6)]
    assert first == again and len(first) == 4
    assert list(first) == sorted(first, key=full.index)
    assert any(o != first for o in other)
    assert build_prompts(condition(tmp_path, extra="max_prompts = 100")).texts == full


def test_a_huge_product_needs_a_cap_and_is_sampled_lazily(tmp_path):
    slots = "\n".join(f"s{i} = [{', '.join(repr(str(v)) for v in range(20))}]" for i in range(5)).replace("'", '"')
    text = f"""name = "big"
[model]
name = "tiny"
[prompts]
template = "{' '.join('{s%d}' % i for i in range(5))}"
{{cap}}
[prompts.slots]
{slots}
[target]
kind = "neuron"
site = "blocks.0.mlp.hook_post"
unit = 0
"""
    path = tmp_path / "big.toml"
    path.write_text(text.replace("{cap}", ""))
    with pytest.raises(ReduceError, match="prompts.max_prompts: the slots make 3,200,000 prompts"):
        build_prompts(load_condition(path))
    path.write_text(text.replace("{cap}", "max_prompts = 5"))
    prompts = build_prompts(load_condition(path))
    assert len(prompts) == 5 and all(len(t.split()) == 5 for t in prompts.texts)


def test_literal_braces_and_fields():
    assert template_fields("{{x}} {a} {b.c}") == [("a", "text"), ("b", "c")]
    assert render("{{ {a} }} {b.c}", {"a": {"text": "A"}, "b": {"text": "B", "c": "C"}}) == "{ A } C"
    with pytest.raises(ReduceError, match="malformed placeholder '{a.b.c}'"):
        template_fields("x {a.b.c}")
    with pytest.raises(ReduceError, match="malformed placeholder '}'"):
        template_fields("x } y")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\nthird\n")
    records = [{"text": f"the key {i}", "answer": "is", "wrong": "are", "topic": i % 2, "odd": bool(i % 2)} for i in range(6)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    base = 'name = "f"\n[model]\nname = "tiny"\n[prompts]\nfile = "{file}"\n{cap}\n[target]\nkind = "{kind}"\n{neuron}'
    neuron = 'site = "blocks.0.mlp.hook_post"\nunit = 0'
    (tmp_path / "txt.toml").write_text(base.format(file="p.txt", cap="", kind="neuron", neuron=neuron))
    text = build_prompts(load_condition(tmp_path / "txt.toml"))
    assert text.texts == ("first prompt", "second prompt", "third") and text.answers is None and text.labels == {}
    (tmp_path / "jsonl.toml").write_text(base.format(file="p.jsonl", cap="max_prompts = 3", kind="logit_diff", neuron=""))
    jsonl = build_prompts(load_condition(tmp_path / "jsonl.toml"))
    assert len(jsonl) == 3 and jsonl.answers == ("is",) * 3
    assert set(jsonl.labels) == {"topic", "odd"} and set(jsonl.labels["odd"]) <= {"true", "false"}
    indices = [int(t.split()[-1]) for t in jsonl.texts]
    assert indices == sorted(indices) and all(jsonl.labels["topic"][k] == str(i % 2) for k, i in enumerate(indices))


def test_with_a_model_answers_become_single_token_ids(tmp_path):
    model = tiny_text_model("gpt2")
    prompts = build_prompts(condition(tmp_path), model)
    vocabulary = model.tokenizer.get_vocab()
    assert prompts.answer_ids.tolist() == [vocabulary[a] for a in prompts.answers]
    assert prompts.wrong_ids.tolist() == [vocabulary[w] for w in prompts.wrongs]
    np.testing.assert_array_equal(prompts.lengths, [len(t.split()) for t in prompts.texts])


def test_multi_token_answer_and_unequal_counterfactual_are_named(tmp_path):
    model = tiny_text_model("gpt2")
    path = tmp_path / "multi.toml"
    path.write_text(TEMPLATE.format(seed=0, extra="").replace('answer = "{subject.verb}"', 'answer = "{subject.verb} {place}"'))
    with pytest.raises(ReduceError) as caught:
        build_prompts(load_condition(path), model)
    assert caught.value.field == "prompts.answer" and "answer 'is cabinet' (of prompt 0) is 2 tokens ('is', 'cabinet')" in caught.value.message
    path.write_text(TEMPLATE.format(seed=0, extra="").replace('counterfactual = "the {subject.flip} near', 'counterfactual = "the big {subject.flip} near'))
    with pytest.raises(ReduceError) as caught:
        build_prompts(load_condition(path), model)
    assert caught.value.field == "prompts.counterfactual" and "same token count" in caught.value.message
