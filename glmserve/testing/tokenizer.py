"""A tiny GLM-4.5-shaped tokenizer for tests: byte-level BPE trained in milliseconds on a built-in corpus.

The BPE vocab is small, but the added tokens are GLM-4.5's real strings in GLM-4.5's order (GLM45.md §2), appended
right after the BPE vocab exactly as the real tokenizer appends them after its 151329 BPE tokens. Role and control
tokens are special; the reasoning/tool markup tokens are not, so they survive `skip_special_tokens=True` decoding
the way the reasoning and tool parsers expect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# GLM-4.5's added tokens, ids 151329..151364 in the real tokenizer, in id order.
GLM45_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)  # fmt: skip

# Added tokens that decode with skip_special_tokens=True: the text the reasoning and tool parsers read.
NON_SPECIAL_TOKENS: frozenset[str] = frozenset({
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
})  # fmt: skip

EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # config.json eos_token_id, in order
PAD_TOKEN = "<|endoftext|>"

# A few KB of English, code, JSON and Chinese, so merges cover common words while rarer CJK characters and all
# emoji stay split over several byte tokens (what the incremental detokenizer tests need). It must not contain
# the added tokens' strings: BPE could learn one as a vocab entry, and then it would not be appended in order.
DEFAULT_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n",
    "Hello! How can I help you today? I would like to know the weather in Beijing for the next three days.\n",
    "The model reads the prompt, thinks about the question, and then writes an answer for the user.\n",
    "What is 2+2? The answer is 4. And 3+3? That makes 6. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024.\n",
    "Large language models are trained on text and code. They predict the next token given the previous ones.\n",
    "Please call the tool with the city name and the number of days, then summarise the result in one sentence.\n",
    "It was sunny in the morning, cloudy in the afternoon, and it rained a little in the evening.\n",
    "def get_weather(city: str, days: int = 1) -> dict:\n    return {\"city\": city, \"days\": days}\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        continue\n",
    "class Request:\n    def __init__(self, prompt, max_tokens=16):\n        self.prompt = prompt\n"
    "        self.max_tokens = max_tokens\n",
    "import json\nimport os\n\nwith open(os.path.join('data', 'config.json')) as f:\n    config = json.load(f)\n",
    "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get weather\", "
    "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
    "\"required\": [\"city\"]}}}\n",
    "{\"city\": \"Beijing\", \"date\": \"2024-06-27\", \"weather\": \"sunny\", \"temperature\": \"26C\"}\n",
    "You are a helpful assistant. Answer the question step by step and keep the final answer short.\n",
    "SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY count(*) DESC LIMIT 10;\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"hello, world\\n\");\n    return 0;\n}\n",
    "你好，世界！今天天气很好，我们去公园散步吧。\n",
    "请帮我查询一下北京的天气。北京今天晴，气温二十六度，明天多云。\n",
    "请你调用工具，用中文回答问题。用户想查询北京的天气，我需要调用天气工具。\n",
    "人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。\n",
    "我们的模型可以理解中文和英文，也可以写代码。谢谢你的帮助！\n",
    "The user asked in Chinese: 北京天气怎么样？ The assistant answered: 北京今天晴。\n",
)


def build_test_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] | None = None,
                         split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE and append GLM-4.5's added tokens; the total is at most `vocab_size`.

    The result has fewer tokens than `vocab_size` when the corpus runs out of merges; the model's embedding rows
    above the tokenizer's last id are padding, as in the real checkpoint (151365 tokens, 151552 rows).
    `split_digits` makes every digit its own token (as Llama's and DeepSeek's tokenizers do), which small models
    need to learn column arithmetic.
    """
    num_bpe = vocab_size - len(GLM45_ADDED_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if num_bpe < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(GLM45_ADDED_TOKENS)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_bpe, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(list(corpus if corpus is not None else DEFAULT_CORPUS), trainer)

    first_added = tokenizer.get_vocab_size()
    for text in GLM45_ADDED_TOKENS:
        special = text not in NON_SPECIAL_TOKENS
        token = AddedToken(text, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    # add_tokens reuses a vocab entry with the same string instead of appending; catch a corpus that caused it.
    ids = [tokenizer.token_to_id(text) for text in GLM45_ADDED_TOKENS]
    if ids != list(range(first_added, first_added + len(GLM45_ADDED_TOKENS))):
        raise ValueError("the corpus taught BPE an added token's string; remove it from the corpus")
    return tokenizer


def save_test_tokenizer(
    directory: str | Path, vocab_size: int = 1024, chat_template: str | None = None,
    corpus: Iterable[str] | None = None, split_digits: bool = False,
) -> dict:
    """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (loadable by `AutoTokenizer`).

    `corpus` and `split_digits` are passed to `build_test_tokenizer` (the default corpus when None).

    Returns the values a checkpoint writer needs: `num_tokens` (tokenizer size, <= vocab_size), `eos_token_id`
    (the config.json list: endoftext, user, observation), `pad_token_id`, and `token_ids` (added string -> id).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_test_tokenizer(vocab_size, corpus, split_digits)
    tokenizer.save(str(directory / "tokenizer.json"))

    token_ids = {text: tokenizer.token_to_id(text) for text in GLM45_ADDED_TOKENS}
    added_tokens_decoder = {
        str(token_ids[text]): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": text not in NON_SPECIAL_TOKENS,
        }
        for text in GLM45_ADDED_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "eos_token": EOS_TOKENS[0],
        "pad_token": PAD_TOKEN,
        # Byte-level BPE decodes spaces exactly; transformers' cleanup would make its decode differ from ours.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)

    return {
        "num_tokens": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_token_id": [token_ids[text] for text in EOS_TOKENS],
        "pad_token_id": token_ids[PAD_TOKEN],
        "token_ids": token_ids,
    }
