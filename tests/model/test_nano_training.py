"""Training the embedded model, scaled down to seconds: the loss falls, and the checkpoint it writes loads in
glmserve and in transformers with equal logits. The real (hour-long) run is `python -m glmserve.nano.train`."""

import itertools
import json

import pytest
import torch

from glmserve.layers.attention import DenseBatch
from glmserve.nano.checkpoint import TINY_SHAPE, init_model, load_checkpoint, nano_config, save_checkpoint
from glmserve.nano.corpus import conversations
from glmserve.nano.data import collate, encode
from glmserve.nano.evaluate import evaluate
from glmserve.nano.objective import compute_losses
from glmserve.nano.train import main as train_main
from glmserve.nano.verify import max_logit_difference
from glmserve.serving.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano_tiny")
    train_main(["--out", str(out), "--shape", "tiny", "--max-steps", "40", "--tokens-per-batch", "1024",
                "--max-len", "384", "--lr", "1e-2", "--warmup-steps", "5", "--tokenizer-conversations", "200",
                "--dtype", "float32", "--log-seconds", "1000", "--seed", "7"])
    return out


def _heldout_batch(tokenizer: Tokenizer):
    sequences = [s for conversation in itertools.islice(conversations(11, "heldout"), 12)
                 for s in encode(tokenizer, conversation) if len(s.ids) <= 384]
    return collate(sequences, tokenizer.token_to_id("<|endoftext|>"))


def test_training_lowers_the_heldout_loss(trained):
    config = json.loads((trained / "config.json").read_text())
    batch = _heldout_batch(Tokenizer(trained))
    with torch.inference_mode():
        before = compute_losses(init_model(config, seed=7), batch)
        after = compute_losses(load_checkpoint(trained), batch)
    assert after.main.item() < before.main.item() - 1.0
    assert after.mtp.item() < before.mtp.item() - 1.0


def test_training_continues_from_a_checkpoint(trained, tmp_path):
    """--init-from keeps the tokenizer and the weights: the continued model starts where the first run ended."""
    train_main(["--out", str(tmp_path), "--init-from", str(trained), "--max-steps", "3", "--tokens-per-batch",
                "1024", "--max-len", "384", "--lr", "1e-3", "--warmup-steps", "1", "--dtype", "float32",
                "--log-seconds", "1000", "--seed", "8"])
    assert (tmp_path / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    batch = _heldout_batch(Tokenizer(trained))
    with torch.inference_mode():
        before = compute_losses(load_checkpoint(trained), batch).main.item()
        after = compute_losses(load_checkpoint(tmp_path), batch).main.item()
    assert abs(after - before) < 0.3 and after != before


def test_name_weight_weighs_the_called_names_tokens_in_the_main_loss(trained):
    """name_weight w: the main loss is the mean cross-entropy with the tokens of called names counted w times,
    computed here by hand from the model's logits; w = 1 is the plain mean."""
    model, batch = load_checkpoint(trained), _heldout_batch(Tokenizer(trained))
    assert batch.emphasis.any()
    b, s = batch.ids.shape
    with torch.inference_mode():
        hidden = model(batch.ids.flatten(), torch.arange(s).repeat(b), DenseBatch(b)).view(b, s, -1)
        keep = batch.target[:, 1:]
        per_token = torch.nn.functional.cross_entropy(model.compute_logits(hidden[:, :-1][keep]),
                                                      batch.ids[:, 1:][keep], reduction="none")
        names = batch.emphasis[:, 1:][keep]
        for weight in (1.0, 4.0):
            weights = torch.where(names, weight, 1.0)
            expected = (per_token * weights).sum() / weights.sum()
            assert compute_losses(model, batch, weight).main.item() == pytest.approx(expected.item(), rel=1e-5)
        assert per_token[names].mean() > per_token[~names].mean()  # so the weighting moves the loss
        assert compute_losses(model, batch, 4.0).main.item() > compute_losses(model, batch).main.item()


def test_checkpoint_files_are_a_glm45_checkpoint(trained):
    config = json.loads((trained / "config.json").read_text())
    tokenizer = Tokenizer(trained)
    eos = [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["num_nextn_predict_layers"] == 1
    assert config["eos_token_id"] == eos
    assert json.loads((trained / "generation_config.json").read_text())["eos_token_id"] == eos
    assert "[gMASK]<sop>" in tokenizer.chat_template


def test_checkpoint_loads_in_transformers_with_equal_logits(trained):
    assert max_logit_difference(trained) <= 1e-4


def test_checkpoint_generates_in_glmserve(trained):
    from glmserve import LLM
    from glmserve.types import SamplingParams

    llm = LLM(trained, num_kv_blocks=64)
    out = llm.generate("[gMASK]<sop><|user|>\nWhat is 3 + 4?<|assistant|>", SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) >= 1


def test_evaluation_runs_through_the_server(trained):
    rates = evaluate(trained, per_kind=2, max_tokens=8, mtp_conversations=4, threads=1)
    assert {"tool_name_accuracy", "nonthinking_direct_answer", "mtp_agreement_with_main"} <= set(rates)
    assert all(0.0 <= value <= 1.0 for value in rates.values())


def test_save_checkpoint_inverts_the_loader(tmp_path):
    """Every parameter, MTP layer included, comes back exactly through glmserve's loader."""
    config = nano_config(TINY_SHAPE, [0, 1, 2], 0, dtype="float32")
    model = init_model(config, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))  # no two tensors alike (norms start at one, biases at zero)
    save_checkpoint(model, config, tmp_path)
    loaded = dict(load_checkpoint(tmp_path).named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(loaded[name], param.detach()), name


def test_average_of_two_continuations_is_their_elementwise_mean(trained, tmp_path):
    """A model soup: every tensor the mean of the inputs', the first input's config and tokenizer, a checkpoint
    that loads; another tokenizer or another tensor shape is refused."""
    from safetensors.torch import load_file, save_file

    from glmserve.nano.average import average_checkpoints

    continued = tmp_path / "continued"
    train_main(["--out", str(continued), "--init-from", str(trained), "--max-steps", "3", "--tokens-per-batch",
                "1024", "--max-len", "384", "--lr", "1e-2", "--warmup-steps", "1", "--dtype", "float32",
                "--log-seconds", "1000", "--seed", "9"])
    out = average_checkpoints([trained, continued], tmp_path / "soup")
    first, second = load_file(trained / "model.safetensors"), load_file(continued / "model.safetensors")
    averaged = load_file(out / "model.safetensors")
    assert averaged.keys() == first.keys()
    assert any(not torch.equal(first[n], second[n]) for n in first)
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-7)
    assert (out / "config.json").read_text() == (trained / "config.json").read_text()
    assert (out / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    with torch.inference_mode():
        assert torch.isfinite(compute_losses(load_checkpoint(out), _heldout_batch(Tokenizer(out))).main)

    other_tokenizer = tmp_path / "other_tokenizer"
    average_checkpoints([continued, trained], other_tokenizer)
    renamed = (trained / "tokenizer.json").read_text().replace("<think>", "<thonk>")
    (other_tokenizer / "tokenizer.json").write_text(renamed)
    with pytest.raises(ValueError, match="another tokenizer"):
        average_checkpoints([trained, other_tokenizer], tmp_path / "refused")
    name = next(n for n, t in second.items() if t.dim() == 2)
    second[name] = second[name][:-1].contiguous()
    save_file(second, str(continued / "model.safetensors"))
    with pytest.raises(ValueError, match="names, shapes or dtypes"):
        average_checkpoints([trained, continued], tmp_path / "refused")


def test_growing_appends_layers_that_leave_the_model_unchanged(trained, tmp_path):
    """Grown by two MoE layers: the same losses (main and MTP) as the source, still equal to transformers, and
    trainable (the new layers' zeroed output projections get gradients)."""
    from glmserve.nano.grow import grow_depth

    grown = grow_depth(trained, tmp_path / "grown", extra_layers=2)
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (grown, trained))
    assert config["num_hidden_layers"] == source_config["num_hidden_layers"] + 2
    batch = _heldout_batch(Tokenizer(trained))
    with torch.inference_mode():
        before, after = (compute_losses(load_checkpoint(d), batch) for d in (trained, grown))
    assert after.main.item() == pytest.approx(before.main.item(), abs=1e-6)
    assert after.mtp.item() == pytest.approx(before.mtp.item(), abs=1e-6)
    assert max_logit_difference(grown) <= 1e-4

    model = load_checkpoint(grown).train()
    new_layer = model.model.layers[config["num_hidden_layers"] - 1]
    zeroed = (new_layer.self_attn.o_proj.weight, new_layer.mlp.shared_experts.down_proj.weight)
    for weight in zeroed:
        weight.requires_grad_(True)
    compute_losses(model, batch).main.backward()
    for weight in zeroed:
        assert weight.abs().max() == 0 and weight.grad.abs().max() > 0


def test_widening_adds_channels_and_heads_that_leave_the_model_unchanged(trained, tmp_path):
    """Widened to more hidden channels and heads: the same losses (main and MTP) as the source, still equal to
    transformers, and trainable (the zeroed writers of the new channels and heads get gradients)."""
    from glmserve.nano.widen import widen

    source_config = json.loads((trained / "config.json").read_text())
    hidden, heads, kv_heads = (source_config[k] for k in ("hidden_size", "num_attention_heads",
                                                          "num_key_value_heads"))
    widened = widen(trained, tmp_path / "wide", hidden + 16, 2 * heads, 2 * kv_heads)
    config = json.loads((widened / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (hidden + 16, 2 * heads)
    batch = _heldout_batch(Tokenizer(trained))
    with torch.inference_mode():
        before, after = (compute_losses(load_checkpoint(d), batch) for d in (trained, widened))
    assert after.main.item() == pytest.approx(before.main.item(), abs=1e-5)
    assert after.mtp.item() == pytest.approx(before.mtp.item(), abs=1e-5)
    assert max_logit_difference(widened) <= 1e-4

    model = load_checkpoint(widened).train()
    attention = model.model.layers[config["num_hidden_layers"] - 1].self_attn
    head_columns = heads * source_config["head_dim"]
    zeroed = {"embedding's new columns": (model.model.embed_tokens.weight, (slice(None), slice(hidden, None))),
              "o_proj's new rows": (attention.o_proj.weight, (slice(hidden, None), slice(None))),
              "o_proj's new heads": (attention.o_proj.weight, (slice(None), slice(head_columns, None)))}
    for weight, _ in zeroed.values():
        weight.requires_grad_(True)
    compute_losses(model, batch).main.backward()
    for what, (weight, part) in zeroed.items():
        assert weight[part].abs().max() == 0 and weight.grad[part].abs().max() > 0, what


def test_widening_refuses_to_shrink_or_regroup_heads(trained, tmp_path):
    from glmserve.nano.widen import widen

    config = json.loads((trained / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    with pytest.raises(ValueError, match="shrink"):
        widen(trained, tmp_path / "narrow", hidden - 16, heads, kv_heads)
    with pytest.raises(ValueError, match="per key/value head"):
        widen(trained, tmp_path / "regrouped", hidden, 2 * heads, kv_heads)
