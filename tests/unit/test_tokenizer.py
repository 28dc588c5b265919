"""The test tokenizer (GLM-4.5 added tokens on a tiny BPE), the serving Tokenizer and the incremental detokenizer."""

import json
import random

import pytest

from glmserve.serving.tokenizer import IncrementalDetokenizer, Tokenizer
from glmserve.testing.tokenizer import (
    GLM45_ADDED_TOKENS,
    NON_SPECIAL_TOKENS,
    build_test_tokenizer,
    save_test_tokenizer,
)

TEXTS = [
    "hello world",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "def f(x):\n    return x * 2  # comment",
    "北京天气怎么样？今天晴，气温二十六度。",
    "蕴含着罕见的汉字：鑫龘齉",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇨🇳",
    "mixed: café naïve Ünïcödé ∑∫√ 한국어 日本語",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm_tokenizer")
    info = save_test_tokenizer(directory, chat_template="{{ messages[0].content }}")
    return directory, info


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir[0])


# --- the test tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [292, 300, 512, 1024, 4096])
def test_size_and_added_token_order(vocab_size):
    tokenizer = build_test_tokenizer(vocab_size)
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    num_bpe = tokenizer.get_vocab_size(with_added_tokens=False)
    assert total <= vocab_size
    assert total == num_bpe + len(GLM45_ADDED_TOKENS)
    assert [tokenizer.token_to_id(t) for t in GLM45_ADDED_TOKENS] == list(range(num_bpe, total))


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError):
        build_test_tokenizer(256)


def test_build_is_deterministic():
    assert build_test_tokenizer().to_str() == build_test_tokenizer().to_str()


def test_default_fills_requested_size():
    assert build_test_tokenizer(1024).get_vocab_size() == 1024


def test_save_returns_config_ids(tokenizer_dir):
    directory, info = tokenizer_dir
    ids = info["token_ids"]
    assert info["num_tokens"] <= 1024
    assert info["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    assert info["pad_token_id"] == ids["<|endoftext|>"]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == "{{ messages[0].content }}"
    flags = {entry["content"]: entry["special"] for entry in config["added_tokens_decoder"].values()}
    assert flags == {t: t not in NON_SPECIAL_TOKENS for t in GLM45_ADDED_TOKENS}


def test_no_post_processor_adds_tokens(tok):
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


def test_autotokenizer_agrees(tokenizer_dir, tok):
    transformers = pytest.importorskip("transformers")
    directory, info = tokenizer_dir
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert len(hf) == info["num_tokens"] == tok.vocab_size
    assert hf.eos_token_id == tok.eos_token_id == info["eos_token_id"][0]
    assert hf.pad_token_id == info["pad_token_id"]
    assert hf.chat_template == tok.chat_template
    markup = "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think>r</think>\n<tool_call>f\n<arg_key>k</arg_key>"
    for text in TEXTS + [markup]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        for skip in (True, False):
            assert hf.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
        assert hf._encode_without_added_tokens(text) == tok.encode_plain(text)


# --- the serving Tokenizer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_plain(text)) == text


def test_special_flags(tok, tokenizer_dir):
    ids = tokenizer_dir[1]["token_ids"]
    assert tok.special_token_ids == {ids[t] for t in GLM45_ADDED_TOKENS if t not in NON_SPECIAL_TOKENS}
    text = "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>r</think>\n<tool_call>f\n</tool_call><|observation|>"
    encoded = tok.encode(text)
    assert encoded[:3] == [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"]]
    assert tok.decode(encoded) == "\nq\n<think>r</think>\n<tool_call>f\n</tool_call>"
    assert tok.decode(encoded, skip_special_tokens=False) == text


def test_token_lookup(tok, tokenizer_dir):
    ids = tokenizer_dir[1]["token_ids"]
    assert tok.token_to_id("<|user|>") == ids["<|user|>"]
    assert tok.id_to_token(ids["/nothink"]) == "/nothink"
    assert tok.token_to_id("not a token") is None
    assert tok.special_tokens_map == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_ids_past_the_vocab_decode_to_nothing(tok):
    ids = tok.encode("ab")
    assert tok.decode([ids[0], tok.vocab_size, 5000, ids[1]]) == "ab"


def test_encode_plain_never_produces_added_tokens(tok):
    text = "<|user|>\n[gMASK]<think>x</think><tool_call>/nothink"
    plain = tok.encode_plain(text)
    assert not set(plain) & tok.added_token_ids
    assert tok.decode(plain) == text
    assert tok.encode("<|user|>") == [tok.token_to_id("<|user|>")]
    assert tok.token_to_id("<|user|>") not in tok.encode_plain("<|user|>")


def test_chat_template_sources(tmp_path, tokenizer_dir):
    source = tokenizer_dir[0]
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer(tmp_path).chat_template == "J"
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer(tmp_path).chat_template is None


# --- IncrementalDetokenizer -------------------------------------------------------------------------------------


def stream(tok, ids, chunk_sizes, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    for size in chunk_sizes:
        pieces.append(detok.push(ids[i : i + size]))
        i += size
    return pieces, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_never_shows_replacement_chars(tok, text):
    ids = tok.encode(text)
    pieces, rest = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == text and rest == ""
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_characters_are_split_over_tokens(tok):
    # Without this the tests above would not exercise the hold-back path.
    assert len(tok.encode("😀")) == 4 and len(tok.encode("齉")) == 3


def test_random_ids_stream_equals_full_decode(tok):
    rng = random.Random(0)
    # Byte tokens of multi-byte characters make incomplete and invalid UTF-8 likely; ids past the vocab included.
    multibyte = sorted({i for text in TEXTS for i in tok.encode(text)})
    for _ in range(500):
        ids = [
            rng.choice(multibyte) if rng.random() < 0.6 else rng.randrange(tok.vocab_size + 8)
            for _ in range(rng.randrange(40))
        ]
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, rng.randrange(1, 5)))
            left -= sizes[-1]
        for skip in (True, False):
            pieces, rest = stream(tok, ids, sizes, skip_special_tokens=skip)
            assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_in_stream(tok):
    ids = tok.encode("<think>好</think>\n答案<|user|>")
    pieces, rest = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) + rest == "<think>好</think>\n答案"
    pieces, rest = stream(tok, ids, [1] * len(ids), skip_special_tokens=False)
    assert "".join(pieces) + rest == "<think>好</think>\n答案<|user|>"


def test_flush_returns_incomplete_tail(tok):
    ids = tok.encode("a😀")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:1]) == "a"
    assert detok.push(ids[1:]) == ""
    assert detok.flush() == tok.decode(ids)[1:] == "\ufffd"
    assert detok.flush() == ""
