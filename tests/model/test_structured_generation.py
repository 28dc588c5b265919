"""Structured output through the engine (no server): grammar-held outputs on random weights, where nothing but the
grammar can make valid JSON; constrained greedy identical with and without MTP drafts; unconstrained requests in
the same batch untouched."""

import json
import re
from dataclasses import replace

import jsonschema
import pytest

from glmserve import LLM, SamplingParams
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.structured_output import GrammarSpec, StructuredOutputCompiler
from glmserve.serving.tokenizer import Tokenizer
from glmserve.testing.structured_cases import JSON_SCHEMAS

GREEDY = SamplingParams(temperature=0.0, max_tokens=300)
PROMPTS = ["Write the record as JSON:", "[gMASK]<sop><|user|>\nGive me data<|assistant|>\n<think></think>\n"]


@pytest.fixture(scope="module")
def random_llm(checkpoints):
    return LLM(checkpoints("glm45"), num_kv_blocks=512, max_num_batched_tokens=512)


def _constraints(model_dir, specs):
    compiler = StructuredOutputCompiler(Tokenizer(model_dir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return [compiler.compile_now(spec, vocab) for spec in specs]


def _json_specs():
    return [GrammarSpec("json_schema", schema, "test") for schema in JSON_SCHEMAS]


def _texts(llm, prompts, params):
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def test_json_schemas_hold_on_random_weights(random_llm, checkpoints):
    """Every output that ends (on a stop token, which the grammar allows only once the JSON is complete) parses and
    validates. A grammar cannot make random weights end an unbounded string (an email's local part, a free
    string): those may run to max_tokens, and a few do; most outputs must end."""
    constraints = _constraints(checkpoints("glm45"), _json_specs())
    num_ended = num_outputs = 0
    for prompt, params in zip(PROMPTS, (GREEDY, replace(GREEDY, temperature=1.0, seed=7))):
        outputs = random_llm.generate([prompt] * len(constraints), [replace(params, grammar=c) for c in constraints])
        for schema, out in zip(JSON_SCHEMAS, outputs):
            num_outputs += 1
            if out.outputs[0].finish_reason == "stop":
                num_ended += 1
                jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert num_ended >= 0.8 * num_outputs, (num_ended, num_outputs)


def test_regex_choice_and_grammar_outputs_match(random_llm, checkpoints):
    specs = [GrammarSpec("regex", r"[a-z]{2,5}-\d{3}", "t"), GrammarSpec("choice", ["up", "down", "sideways"], "t"),
             GrammarSpec("ebnf", 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"', "t"),
             GrammarSpec("lark", 'start: "yes" | "no"', "t"), GrammarSpec("json_object", None, "t")]
    constraints = _constraints(checkpoints("glm45"), specs)
    outputs = random_llm.generate(["Answer:"] * len(specs), [replace(GREEDY, max_tokens=60, grammar=c)
                                                             for c in constraints])
    texts = [o.outputs[0].text for o in outputs]
    assert re.fullmatch(r"[a-z]{2,5}-\d{3}", texts[0]), texts[0]
    assert texts[1] in ("up", "down", "sideways")
    assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3}){0,3}\)", texts[2]), texts[2]
    assert texts[3] in ("yes", "no")
    if outputs[4].outputs[0].finish_reason == "stop":  # random weights may not end a free JSON key
        assert isinstance(json.loads(texts[4]), (dict, list))


def test_unconstrained_requests_in_the_batch_are_untouched(random_llm, checkpoints):
    prompts = ["The quick brown fox", "Numbers: 1 2 3", "Hello! How can I", "def get_weather(city"]
    plain = replace(GREEDY, max_tokens=40, ignore_eos=True)
    alone = _texts(random_llm, prompts, plain)
    constraints = _constraints(checkpoints("glm45"), _json_specs()[:8])
    mixed = _texts(random_llm, prompts + ["JSON:"] * 8, [plain] * 4 + [replace(GREEDY, grammar=c) for c in constraints])
    assert mixed[:4] == alone


@pytest.mark.parametrize("model", ["embedded", "random"])
def test_mtp_drafts_change_no_constrained_greedy_output(model, checkpoints):
    model_dir = EMBEDDED_MODEL if model == "embedded" else checkpoints("glm45")
    constraints = _constraints(model_dir, _json_specs()[::3])
    prompt = ("[gMASK]<sop><|user|>\nDescribe a person and a place.<|assistant|>\n<think></think>\n"
              if model == "embedded" else "JSON:")
    params = [replace(GREEDY, max_tokens=120, grammar=c) for c in constraints]
    outputs = []
    for k in (0, 3):
        llm = LLM(model_dir, num_kv_blocks=512, max_num_batched_tokens=512,
                  speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
        outputs.append([o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params)])
        if k and model == "embedded":  # the drafts were really verified: some kept, some refused
            stats = llm.engine.scheduler.spec_decoding
            assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert outputs[0] == outputs[1]


def test_matchers_live_from_add_request_to_the_end(random_llm, checkpoints):
    """A constrained request's matcher is made as the engine takes it in (no step looks for grammars) and dropped
    when it finishes, so steps after it do no grammar work."""
    engine = random_llm.engine
    (constraint,) = _constraints(checkpoints("glm45"), _json_specs()[:1])
    engine.add_request("held", [5, 6, 7], replace(GREEDY, max_tokens=20, grammar=constraint))
    assert set(engine.structured_output.states) == {"held"}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.structured_output.states == {}
