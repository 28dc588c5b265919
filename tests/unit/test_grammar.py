"""Structured output's parts: request fields to grammar specs, the schema check, GLM tool-call grammars, the
engine's matcher state (drafts advanced and rolled back, the start after </think>) and the bitmask kernels."""

import pickle

import pytest
import torch
import xgrammar as xgr

from glmserve.engine.grammar import GrammarReceiver, GrammarSender, GrammarState, StructuredOutputManager
from glmserve.engine.token_bitmask import apply_token_bitmask
from glmserve.models import EMBEDDED_MODEL
from glmserve.serving.protocol import ChatCompletionRequest, CompletionRequest
from glmserve.serving.structured_output import (
    GrammarSpec,
    StructuredOutputCompiler,
    check_json_schema,
)
from glmserve.serving.tokenizer import Tokenizer
from glmserve.serving.tool_grammar import tool_call_grammar
from glmserve.types import ParamError, Request, SamplingParams

VOCAB = 2048
MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return StructuredOutputCompiler(tokenizer)


class _TokenMatcher:
    """xgrammar's matcher fed text as the model writes it: its tokens, GLM's markup as one token each (the tool
    grammars accept markup only as that token)."""

    def __init__(self, compiled, tokenizer):
        self.matcher, self._tokenizer = xgr.GrammarMatcher(compiled), tokenizer

    def accept_string(self, text: str) -> bool:
        return all(self.matcher.accept_token(t) for t in self._tokenizer.encode(text))


def _matcher(compiler, spec):
    return _TokenMatcher(compiler.compile_now(spec, VOCAB).compiled, compiler._tokenizer)


def _accepts(compiler, spec, text) -> bool:
    matcher = _matcher(compiler, spec)
    return matcher.accept_string(text) and (matcher.matcher.is_completed() or matcher.matcher.is_terminated())


# ---- request fields ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, kind, value", [
    ({"response_format": {"type": "json_object"}}, "json_object", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}},
     "json_schema", {"type": "integer"}),
    ({"structured_outputs": {"json": '{"type": "string"}'}}, "json_schema", {"type": "string"}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", ["a", "b"]),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "ebnf", 'root ::= "a"'),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, "lark", 'start: "a"'),
    ({"guided_json": {"type": "boolean"}}, "json_schema", {"type": "boolean"}),
    ({"guided_regex": "a+"}, "regex", "a+"),
    ({"guided_choice": ["x"]}, "choice", ["x"]),
    ({"guided_grammar": 'root ::= "a"'}, "ebnf", 'root ::= "a"'),
    ({"regex": "b+"}, "regex", "b+"),
    ({"ebnf": 'root ::= "b"'}, "ebnf", 'root ::= "b"'),
    ({"json_schema": '{"type": "null"}'}, "json_schema", {"type": "null"}),
    ({"response_format": {"type": "text"}}, None, None),
])
def test_request_fields_name_their_grammar(fields, kind, value):
    for req in (ChatCompletionRequest(messages=MESSAGES, **fields), CompletionRequest(prompt="x", **fields)):
        spec = GrammarSpec.from_request(req)
        assert (spec and spec.kind, spec and spec.value) == (kind, value)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "structural_tag"}},
    {"structured_outputs": {}},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}},
    {"structured_outputs": {"regex": "a", "structural_tag": "{}"}},
    {"guided_regex": "a", "guided_choice": ["b"]},
    {"guided_regex": "a", "ebnf": 'root ::= "a"'},
    {"response_format": {"type": "json_object"}, "guided_regex": "a"},
    {"guided_choice": []},
    {"guided_json": "[1, 2]"},
    {"guided_decoding_backend": "outlines", "guided_regex": "a"},
])
def test_conflicting_or_unsupported_fields_are_param_errors(fields):
    with pytest.raises(ParamError):
        GrammarSpec.from_request(ChatCompletionRequest(messages=MESSAGES, **fields))


def test_schema_check_finds_unenforced_keywords_where_they_are_keywords():
    check_json_schema({"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}}, "p")
    for schema in ({"not": {}}, {"properties": {"a": {"multipleOf": 2}}}, {"items": {"anyOf": [{"if": {}}]}},
                   {"$defs": {"d": {"dependentRequired": {}}}}, {"type": "array", "uniqueItems": True}):
        with pytest.raises(ParamError, match="not supported"):
            check_json_schema(schema, "p")


def test_grammars_that_do_not_compile_are_param_errors(compiler):
    for spec in (GrammarSpec("ebnf", "root ::= ", "g"), GrammarSpec("regex", "[a-", "r"),
                 GrammarSpec("json_schema", {"type": "strin"}, "j")):
        with pytest.raises(ParamError, match="does not compile"):
            compiler.compile_now(spec, VOCAB)


def test_choice_strings_are_matched_exactly(compiler):
    spec = GrammarSpec("choice", ['a "quoted" one', "back\\slash", "two\nlines", "plain"], "c")
    for choice in spec.value:
        assert _accepts(compiler, spec, choice)
    assert not _matcher(compiler, spec).accept_string("plainer")


def test_json_strings_admit_no_raw_control_characters(compiler):
    spec = GrammarSpec("json_schema", {"type": "string", "maxLength": 5}, "j")
    assert _accepts(compiler, spec, '"ab"')
    assert not _matcher(compiler, spec).accept_string('"a\tb"')


# ---- tool calls in GLM-4.5's syntax ------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}, "mode": {"enum": ["loud", "soft"]},
        "label": {"type": "string"}}, "required": ["hour"]}}},
    {"type": "function", "function": {"name": "find", "parameters": {"type": "object", "properties": {
        "q": {"type": "string"}, "opts": {"type": "object", "properties": {"n": {"type": "integer"}}}},
        "required": ["q"]}}},
]
CALL = "set_alarm\n<arg_key>hour</arg_key>\n<arg_value>7</arg_value>\n<arg_key>mode</arg_key>\n<arg_value>soft" \
       "</arg_value>\n</tool_call>"


def test_required_tool_calls_follow_the_schema(compiler):
    spec = tool_call_grammar(TOOLS, None, True, parallel=True)
    assert _accepts(compiler, spec, CALL)
    assert _accepts(compiler, spec, CALL + '\n<tool_call>find\n<arg_key>q</arg_key>\n<arg_value>a b\n c</arg_value>'
                                           '\n<arg_key>opts</arg_key>\n<arg_value>{"n": 3}</arg_value>\n</tool_call>')
    for wrong in ("unknown\n<arg_key>hour</arg_key>",  # not a listed function
                  "set_alarm\n<arg_key>hours</arg_key>",  # not a property
                  "set_alarm\n<arg_key>mode</arg_key>",  # required hour missing (properties in schema order)
                  "set_alarm\n<arg_key>hour</arg_key>\n<arg_value>24</arg_value>",  # out of bounds
                  "set_alarm\n<arg_key>hour</arg_key>\n<arg_value> 7</arg_value>",  # padding would stay in values
                  "set_alarm\n<arg_key>hour</arg_key>\n<arg_value>7</arg_value>\n<arg_key>hour</arg_key>",  # repeat
                  ("set_alarm\n<arg_key>hour</arg_key>\n<arg_value>7</arg_value>\n<arg_key>mode</arg_key>\n"
                   "<arg_value>loudest</arg_value>"),
                  "find\n<arg_key>q</arg_key>\n<arg_value>a</tool_call>"):  # markup inside a value
        assert not _matcher(compiler, spec).accept_string(wrong), wrong


def test_no_value_padding_in_any_functions_rules(compiler):
    # xgrammar names the second function's rules differently (whitespace_24_1): they must lose the padding too.
    spec = tool_call_grammar(TOOLS[::-1], None, True, parallel=True)
    assert _accepts(compiler, spec, CALL)
    for padded in ("set_alarm\n<arg_key>hour</arg_key>\n<arg_value> 7",
                   "set_alarm\n<arg_key>hour</arg_key>\n<arg_value>7 </arg_value>"):
        assert not _matcher(compiler, spec).accept_string(padded), padded


def test_one_call_only_without_parallel_tool_calls(compiler):
    spec = tool_call_grammar(TOOLS, None, True, parallel=False)
    assert _accepts(compiler, spec, CALL)
    assert not _matcher(compiler, spec).accept_string(CALL + "\n<tool_call>")


def test_named_tool_choice_holds_the_arguments_and_the_close(compiler):
    spec = tool_call_grammar(TOOLS, "find", False, parallel=True)
    assert _accepts(compiler, spec, "<arg_key>q</arg_key>\n<arg_value>x</arg_value>\n</tool_call>")
    assert not _matcher(compiler, spec).accept_string("<arg_key>hour</arg_key>")


def test_auto_holds_only_strict_tools_or_by_server_level(compiler):
    assert tool_call_grammar(TOOLS, None, False, True) is None
    strict = [TOOLS[0], {**TOOLS[1], "function": {**TOOLS[1]["function"], "strict": True}}]
    for spec in (tool_call_grammar(strict, None, False, True), tool_call_grammar(TOOLS, None, False, True,
                                                                                 "parameter")):
        assert _accepts(compiler, spec, "Sure, I can help.")
        assert _accepts(compiler, spec, "Let me look.\n<tool_call>find\n<arg_key>q</arg_key>\n<arg_value>x"
                                        "</arg_value>\n</tool_call>")
        assert not _matcher(compiler, spec).accept_string("<tool_call>find\n<arg_key>query</arg_key>")
        assert not _matcher(compiler, spec).accept_string("<tool_call>lookup")
    # "function": names held, a non-strict tool's arguments free
    spec = tool_call_grammar(TOOLS, None, False, True, "function")
    assert _accepts(compiler, spec, "<tool_call>find\n<arg_key>query</arg_key>\n<arg_value>x</arg_value>\n"
                                    "</tool_call>")
    assert not _matcher(compiler, spec).accept_string("<tool_call>lookup")


def test_markup_and_keys_only_in_their_own_tokens(compiler, tokenizer):
    """The embedded model, made to end a key it would rather go on with, chose `<` over `</arg_key>` when the
    grammar allowed both, spelled the markup in pieces and looped in the next value until max_tokens (8 of 150
    user-tool calls under --tool-strict-level parameter)."""
    for spec, prefix in ((tool_call_grammar(TOOLS, None, True, parallel=True), ""),
                         (tool_call_grammar(TOOLS, None, False, True, "parameter"), "<tool_call>"),
                         (tool_call_grammar(TOOLS, "set_alarm", False, parallel=True), "")):
        body = CALL if prefix or not spec.value["format"]["type"] == "sequence" else CALL[len("set_alarm\n"):]
        text = prefix + body
        assert _accepts(compiler, spec, text)
        for markup in ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "</tool_call>"):
            cut = text.index(markup)
            matcher = _matcher(compiler, spec)
            assert matcher.accept_string(text[:cut])
            pieces = tokenizer.encode_plain(markup)
            assert len(pieces) > 1 and not matcher.matcher.accept_token(pieces[0]), (markup, text[:cut])
            assert matcher.matcher.accept_token(tokenizer.token_to_id(markup))
    # a key only in the tokenizer's own tokens: the same model, masked away from `target` in
    # `<arg_key>outputLanguage`, wrote `o`, `u`, `t`, `put`, ... and looped in the value
    spec = tool_call_grammar(TOOLS, None, True, parallel=True)
    matcher = _matcher(compiler, spec)
    h, our = tokenizer.encode("hour")
    assert matcher.accept_string("set_alarm\n<arg_key>") and matcher.matcher.accept_token(h)
    assert not matcher.matcher.accept_token(tokenizer.encode("o")[0])  # "h", "o", "ur" spells it too
    assert matcher.matcher.accept_token(our) and matcher.accept_string("</arg_key>")
    # a value may still hold text that starts like markup
    spec = tool_call_grammar(TOOLS, "find", False, parallel=True)
    assert _accepts(compiler, spec, "<arg_key>q</arg_key>\n<arg_value>a <b> </c</arg_value>\n</tool_call>")


# ---- the engine's matcher state ----------------------------------------------------------------------------------

def _request(rid, constraint):
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=50, grammar=constraint), eos_token_ids=frozenset({2012}))


def test_matcher_starts_after_think_close_and_rolls_back_over_it(compiler, tokenizer):
    constraint = compiler.compile_now(GrammarSpec("regex", "ok", "r"), VOCAB, thinking=True)
    state = GrammarState(constraint, [2012])
    think_close, ok = compiler.think_close_id, tokenizer.encode("ok")
    free = tokenizer.encode("any reasoning")
    assert all(state.advance(t) for t in free) and not state.active
    assert state.advance(think_close) and state.active
    assert not state.advance(tokenizer.encode("no")[0])
    assert all(state.advance(t) for t in ok)
    state.rollback(len(ok) + 1)  # back over </think>: free again
    assert not state.active
    assert state.advance(free[0]) and state.advance(think_close) and all(state.advance(t) for t in ok)


def test_bitmask_rows_follow_the_drafts_and_leave_the_matcher_as_it_was(compiler, tokenizer):
    constraint = compiler.compile_now(GrammarSpec("regex", "(ab|cd)+!", "r"), VOCAB)
    abcd = [tokenizer.encode(s)[0] for s in ("a", "b", "c", "d", "!")]
    a, b, c, _, bang = abcd
    manager = StructuredOutputManager()
    held, free = _request("held", constraint), Request("free", [1], SamplingParams())
    manager.add(held)
    manager.accept([held], [[a]])
    held.token_ids.append(a)

    def expected_row(prefix):
        matcher = xgr.GrammarMatcher(constraint.compiled, override_stop_tokens=[2012])
        assert all(matcher.accept_token(t) for t in [a] + prefix)
        row = xgr.allocate_token_bitmask(1, VOCAB)
        matcher.fill_next_token_bitmask(row)
        return row[0]

    drafts = [[b, c, a], [5]]  # held: "ab", "abc" can go on; "abca" cannot
    bitmask, rows = manager.bitmask([held, free], drafts, VOCAB)
    assert rows == [0, 1, 2]  # held's rows up to the forbidden draft; the free request's rows are never masked
    for j, prefix in enumerate([[], [b], [b, c]]):
        assert torch.equal(bitmask[j], expected_row(prefix))
    assert torch.equal(bitmask[3], torch.full_like(bitmask[3], -1))
    again, _ = manager.bitmask([held], [[]], VOCAB)
    assert torch.equal(again[0], expected_row([]))  # the drafts were rolled back
    manager.accept([held, free], [[b, bang], [7]])
    assert manager.states["held"].matcher.accept_token(2012)


def test_a_request_ignoring_eos_gets_a_matcher_too(compiler):
    constraint = compiler.compile_now(GrammarSpec("regex", "ok", "r"), VOCAB)
    request = Request("r", [1], SamplingParams(ignore_eos=True, grammar=constraint), eos_token_ids=frozenset({2012}))
    manager = StructuredOutputManager()
    manager.add(request)
    bitmask, rows = manager.bitmask([request], [[]], VOCAB)
    assert rows == [0]


def test_a_grammar_travels_to_other_processes_only_serialized(compiler):
    """Tensor-parallel ranks get requests pickled without the compiled grammar (rank 0 sends them the bitmask); a
    data-parallel replica gets it serialized, and its matcher accepts and refuses what the original does."""
    constraint = compiler.compile_now(GrammarSpec("regex", "(ab|cd)+!", "r"), VOCAB, thinking=True)
    copied = pickle.loads(pickle.dumps(constraint))
    assert copied.compiled is None and (copied.start_token_id, copied.description) == (compiler.think_close_id,
                                                                                        "regex")
    receiver = GrammarReceiver()
    sent = pickle.loads(pickle.dumps(GrammarSender(1).serialize(constraint, 0)))
    restored = receiver.restore(sent)
    assert (restored.start_token_id, restored.description) == (constraint.start_token_id, "regex")
    assert _accepts_compiled(restored.compiled, "abcd!") and not _accepts_compiled(restored.compiled, "abc!")


def test_each_replica_gets_the_vocabulary_once(compiler):
    """The compiler's vocabulary travels to a data-parallel replica with its first grammar only (its JSON is ~50
    KB here, megabytes for GLM-4.5's vocabulary); later grammars name it."""
    first, second = (compiler.compile_now(GrammarSpec("regex", r, "r"), VOCAB) for r in ("(ab)+", "(cd)+"))
    sender, receivers = GrammarSender(2), [GrammarReceiver(), GrammarReceiver()]
    sent = [[pickle.loads(pickle.dumps(sender.serialize(c, replica))) for c in (first, second, first)]
            for replica in (0, 1)]
    for replica, (receiver, grammars) in enumerate(zip(receivers, sent)):
        assert grammars[0].vocab_json is not None and grammars[1].vocab_json is grammars[2].vocab_json is None
        assert len(pickle.dumps(grammars[1])) < len(grammars[0].vocab_json) / 10
        restored = [receiver.restore(g).compiled for g in grammars]
        assert _accepts_compiled(restored[0], "abab") and _accepts_compiled(restored[1], "cdcd")
        assert not _accepts_compiled(restored[2], "cd") and len(receiver._vocabs) == 1


def _accepts_compiled(compiled, text) -> bool:
    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def test_bitmask_application_matches_xgrammars_kernel():
    gen = torch.Generator().manual_seed(0)
    for vocab in (2048, 1000, 151552):
        logits = torch.randn(6, vocab, generator=gen)
        bitmask = torch.randint(-2**31, 2**31 - 1, (6, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
        expected, got = logits.clone(), logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=[0, 3, 5], backend="cpu")
        apply_token_bitmask(got, bitmask, [0, 3, 5])
        assert torch.equal(expected, got)
        assert torch.equal(got[[1, 2, 4]], logits[[1, 2, 4]])
        bit = (bitmask[3, 0] >> 5) & 1  # token 5 of row 3
        assert (got[3, 5] == float("-inf")) == (bit == 0)
