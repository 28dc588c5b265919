"""The embedded model's corpus: reproducible, in the exact GLM-4.5 format, parseable back by the server's parsers
into what each turn intends, with a held-out split that training never sees."""

import itertools
import json
import random
import re

import pytest

from glmserve.nano import arithmetic
from glmserve.nano.corpus import OBSERVATION, USER, conversations, examples, is_heldout
from glmserve.nano.data import encode, tokenizer_texts
from glmserve.nano.dialogues import SKILLS
from glmserve.nano.evaluate import heldout_cases
from glmserve.nano.tools import CONFUSABLE_TOOLS, REALISTIC_TOOLS, name_variants, random_tool, slots
from glmserve.serving.parsers.glm45 import parse_output
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.tokenizer import GLM45_ADDED_TOKENS, save_test_tokenizer

_USER_TEXT = re.compile(r"<\|user\|>\n(.*?)(?:/nothink)?(?=<\|assistant\|>)", re.DOTALL)


@pytest.fixture(scope="module")
def train_examples():
    return examples(seed=3, count=600)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nano_tokenizer")
    corpus = tokenizer_texts(itertools.islice(conversations(0), 300))
    save_test_tokenizer(directory, 1024, corpus=corpus, split_digits=True)
    return Tokenizer(directory)


def test_corpus_is_reproducible_and_seeded():
    assert examples(seed=1, count=50) == examples(seed=1, count=50)
    assert examples(seed=1, count=50) != examples(seed=2, count=50)


def test_every_skill_and_both_modes_occur(train_examples):
    kinds = {(e.skill, e.thinking) for e in train_examples}
    for skill in ("tool_call", "arithmetic", "repeat", "greeting", "out_of_skill", "missing_tool"):
        assert {(skill, True), (skill, False)} <= kinds
    assert any(len(e.expected.get("calls", ())) > 1 for e in train_examples)


def test_prompts_end_with_the_generation_prompt_and_completions_with_the_right_stop(train_examples):
    for e in train_examples:
        assert e.prompt.startswith("[gMASK]<sop>")
        assert e.prompt.endswith("<|assistant|>" if e.thinking else "<|assistant|>\n<think></think>")
        assert e.completion.endswith(OBSERVATION if "calls" in e.expected else USER)
        body = e.completion.removesuffix(OBSERVATION).removesuffix(USER)
        assert not any(token in body for token in ("<|user|>", "<|assistant|>", "<|observation|>"))


def test_completions_parse_back_into_the_intended_turn(train_examples):
    for e in train_examples:
        text = e.completion.removesuffix(OBSERVATION).removesuffix(USER)
        reasoning, content, calls = parse_output(text, e.tools, e.thinking)
        assert (reasoning is not None) == e.thinking, e.completion
        if "calls" in e.expected:
            assert content is None
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
                (c["name"], c["arguments"]) for c in e.expected["calls"]]
            continue
        assert not calls and content
        if "values" in e.expected:
            assert all(value in content for value in e.expected["values"])
        if "answer" in e.expected:
            assert re.findall(r"-?\d+", content)[-1] == str(e.expected["answer"])
        if "repeat" in e.expected:
            assert content == e.expected["repeat"] and e.expected["repeat"] in e.user


def test_tool_call_arguments_are_copied_from_the_request(train_examples):
    for e in train_examples:
        if "calls" in e.expected:
            user_text = _USER_TEXT.findall(e.prompt)[-1]
            for call in e.expected["calls"]:
                assert all(json.dumps(v) in user_text or str(v) in user_text for v in call["arguments"].values())


@pytest.mark.parametrize("seed", range(3))
def test_arithmetic_working_is_right_at_every_step(seed):
    rng = random.Random(seed)
    for _ in range(500):
        p = arithmetic.random_problem(rng)
        working = arithmetic.working(p)
        assert working.endswith(f"= {p.answer}.")
        for expression, result in re.findall(r"(-?\d+(?: [-+×] \d+)+) = (-?\d+)", working):
            assert eval(expression.replace("×", "*")) == int(result), working
        # One operation per "=": no prefix of a step reads two ways (a borrow "- 1" vs a digit 1).
        assert not re.search(r"\d [-+×] \d+ [-+×] \d", working), working


def test_tool_specs_are_consistent():
    specs = list(REALISTIC_TOOLS) + [random_tool(random.Random(i)) for i in range(300)]
    assert len({s.name for s in REALISTIC_TOOLS}) == len(REALISTIC_TOOLS)
    for spec in specs:
        keys = {p.key for p in spec.params}
        results = {key for key, _ in spec.result}
        for request in spec.requests:
            assert set(spec.required) <= set(slots(request)) <= keys, (spec.name, request)
        assert set(slots(spec.answer)) <= set(spec.required) | results, spec.name
        assert set(slots(spec.topic)) <= set(spec.required), spec.name


def test_heldout_split_is_disjoint_from_training(train_examples):
    def tool_names(e):
        return {t["function"]["name"] for t in e.tools or ()}

    train_names = set().union(*map(tool_names, train_examples))
    train_texts = {text for e in train_examples for text in _USER_TEXT.findall(e.prompt)}
    assert not any(is_heldout(f"tool:{name}") for name in train_names)
    assert not any(is_heldout(f"text:{text}") for text in train_texts)
    assert not any(is_heldout(f"problem:{e.expected['problem']}") for e in train_examples if "problem" in e.expected)

    cases = heldout_cases(seed=3, per_kind=20)
    for kind, found in cases.items():
        assert len(found) == 20, kind
        assert all(e.user not in train_texts for e in found), kind
    unseen = {c["name"] for e in cases["tool_call_unseen"] for c in e.expected["calls"]
              if is_heldout(f"tool:{c['name']}")}
    assert unseen and not unseen & train_names
    # Realistic tools are held out by name, not as a whole: requests for them train under their other names.
    realistic = {name: spec.name for spec in REALISTIC_TOOLS for name in name_variants(spec.name)}
    held_realistic = {realistic[n] for n in unseen if n in realistic}
    train_realistic = {realistic[n] for n in train_names if n in realistic}
    assert held_realistic and held_realistic <= train_realistic


def test_realistic_tools_have_many_names_and_a_list_holds_each_tool_once(train_examples):
    for spec in REALISTIC_TOOLS:
        names = name_variants(spec.name)
        assert names[0] == spec.name and len(set(names)) == len(names) >= 6, names
    renamed = 0
    for e in train_examples:
        if e.tools:
            names = [t["function"]["name"] for t in e.tools]
            realistic = [n for n in names if any(n in name_variants(s.name) for s in REALISTIC_TOOLS)]
            families = [next(s.name for s in REALISTIC_TOOLS if n in name_variants(s.name)) for n in realistic]
            assert len(set(families)) == len(families), names
            renamed += sum(n not in {s.name for s in REALISTIC_TOOLS} for n in realistic)
            for call in e.expected.get("calls", ()):
                assert call["name"] in names
    assert renamed > 0


def test_tokenizer_has_glm45_added_tokens_and_splits_digits(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in GLM45_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == tokenizer.vocab_size - 1
    assert len(tokenizer.encode("12345")) == 5


def test_piecewise_encoding_equals_whole_text_and_masks_the_completions(tokenizer):
    for conversation in itertools.islice(conversations(5), 60):
        sequences = encode(tokenizer, conversation)
        completions = "".join(e.completion for e in conversation)
        assert sum(len(s.ids) for s in sequences) <= sum(len(tokenizer.encode(e.prompt + e.completion))
                                                         for e in conversation)
        for s in sequences:
            text = tokenizer.decode(s.ids, skip_special_tokens=False)
            assert tokenizer.encode(text) == s.ids
        trained = "".join(tokenizer.decode([i for i, t in zip(s.ids, s.target) if t], skip_special_tokens=False)
                          for s in sequences)
        assert trained == completions


def _runs(ids: list[int], marked: list[bool]) -> list[list[int]]:
    """The maximal runs of marked ids."""
    return [[i for i, _ in run] for m, run in itertools.groupby(zip(ids, marked), key=lambda p: p[1]) if m]


def test_emphasis_marks_exactly_the_called_names_in_reasoning_and_calls(tokenizer):
    seen_thinking = seen_direct = False
    for conversation in itertools.islice(conversations(5), 120):
        sequences = encode(tokenizer, conversation)
        wanted = []
        for example in conversation:
            names = [call["name"] for call in example.expected.get("calls", ())]
            said = list(dict.fromkeys(names)) if example.thinking and names else []  # "I will call A and B."
            wanted += said + names
            seen_thinking |= bool(said)
            seen_direct |= bool(names) and not example.thinking
        runs = [tokenizer.decode(run, skip_special_tokens=False).strip()
                for s in sequences for run in _runs(s.ids, s.emphasis)]
        assert runs == wanted
        assert all(t for s in sequences for t, e in zip(s.target, s.emphasis) if e)  # names are completion tokens
    assert seen_thinking and seen_direct


def test_confusable_tool_lists_hold_only_get_like_tools_and_only_when_asked_for():
    """The hard-negative skill lists tools (mostly 3 or more) whose names start with get's synonyms and calls
    some of them; the default mix (which evaluation draws from) never holds it."""
    families = {v: spec.name for spec in CONFUSABLE_TOOLS for v in name_variants(spec.name)}
    assert len(CONFUSABLE_TOOLS) >= 8
    only = {name: 0.0 for name in SKILLS} | {"confusable_tool": 1.0}
    sizes = []
    for conversation in itertools.islice(conversations(4, "train", only), 80):
        turn = conversation[0]
        names = [t["function"]["name"] for t in turn.tools]
        assert all(n in families for n in names) and len({families[n] for n in names}) == len(names), names
        assert {c["name"] for c in turn.expected["calls"]} <= set(names)
        sizes.append(len(names))
    assert sum(n >= 3 for n in sizes) > len(sizes) / 2
    assert SKILLS["confusable_tool"][1] == 0.0


def test_skill_weights_override_the_mix_by_name():
    only_arithmetic = {name: 0.0 for name in SKILLS} | {"arithmetic": 1.0}
    skills = {c[0].skill for c in itertools.islice(conversations(2, "train", only_arithmetic), 50)}
    assert skills == {"arithmetic"}
    with pytest.raises(ValueError, match="unknown skills"):
        next(conversations(2, "train", {"poetry": 1.0}))
