"""The LoRA flags' forms: vLLM's name=path and JSON, SGLang's --lora-paths (a bare path names itself)."""

import argparse

import pytest

from glmserve.cli_lora import add_lora_flags, lora_engine_fields


def _fields(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_lora_flags(parser)
    args = parser.parse_args(argv)
    return lora_engine_fields(parser, args, model_config=None)


def test_forms(monkeypatch):
    monkeypatch.setattr("glmserve.loader.peft.read_peft_adapter", lambda path, config, rank: None)
    fields = _fields(["--enable-lora", "--lora-modules", "a=/x/a", '{"name": "b", "path": "/x/b", '
                      '"base_model_name": "m"}', "--lora-paths", "c=/x/c", "/x/d", "--max-loras", "3"])
    assert fields["lora_modules"] == (("a", "/x/a"), ("b", "/x/b"), ("c", "/x/c"), ("/x/d", "/x/d"))
    assert fields["enable_lora"] and fields["max_loras"] == 3 and fields["max_lora_rank"] == 16
    assert _fields(["--lora-paths", "c=/x/c"])["enable_lora"]  # SGLang's flag turns LoRA on


@pytest.mark.parametrize("argv,message", [
    (["--lora-modules", "a=/x"], "needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "/x/a"], "expected name=path"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "needs \"name\" and \"path\""),
    (["--enable-lora", "--lora-modules", "a=/nowhere"], "does not exist"),
])
def test_bad_flags_stop_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        _fields(argv)
    assert message in capsys.readouterr().err
