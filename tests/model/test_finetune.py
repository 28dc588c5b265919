"""LoRA fine-tuning: the adapter means what PEFT means by it, `glmserve finetune` writes one PEFT loads and resumes
exactly, and the worked example teaches the embedded model its answer style in a CI-sized run."""

import json

import pytest
import torch

from glmserve import kernels
from glmserve.cli import main as cli_main
from glmserve.finetune import train as finetune_train
from glmserve.finetune.adapter import adapter_from_directory, write_adapter
from glmserve.finetune.example import side_by_side, write_data
from glmserve.finetune.lora import LoraAdapter
from glmserve.layers.attention import DenseBatch
from glmserve.models import EMBEDDED_MODEL
from glmserve.nano.checkpoint import load_checkpoint
from glmserve.serving.tokenizer import Tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
PROMPT = "[gMASK]<sop><|user|>\nWhat is 47 + 38?<|assistant|>\n<think>47 + 38. ones: 7 + 8 = 15"


@pytest.fixture(scope="module")
def ids():
    return torch.tensor(Tokenizer(EMBEDDED_MODEL).encode(PROMPT))


def _ours(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), DenseBatch(1)))


def _rows_before_router_ties(model, ids, monkeypatch, margin: float = 1e-5) -> int:
    """How many leading tokens every router of our model (as it is now) sends clear of a near-tie: where a token's
    k-th and (k+1)-th experts score within `margin`, a last-bit difference between two correct implementations
    (our SiLU's expf and torch's round differently in a few percent of values) may swap the expert. That changes
    the token's row, and every later token's through attention, so only the rows before it compare within 1e-4."""
    first_tie = len(ids)

    def recording(logits, bias, top_k, *args, **kwargs):
        nonlocal first_tie
        best = (logits.float().sigmoid() + bias).topk(top_k + 1, dim=-1).values
        ties = ((best[:, top_k - 1] - best[:, top_k]) < margin).nonzero()
        if len(ties):
            first_tie = min(first_tie, int(ties[0]))
        return route(logits, bias, top_k, *args, **kwargs)

    route = kernels.router_topk
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "router_topk", recording)
        _ours(model, ids)
    return first_tie


def _hf_model(directory=EMBEDDED_MODEL):
    transformers.logging.set_verbosity_error()  # it reports the MTP layer's tensors as unused
    return transformers.Glm4MoeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _random_adapter(model, targets, rank, alpha, rslora, seed=0) -> LoraAdapter:
    adapter = LoraAdapter(model, targets, rank, alpha, rslora, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero (no change); a trained-looking B makes the comparison mean something
        for b in adapter.lora_B:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    return adapter


@pytest.mark.parametrize("shape, targets, rank, alpha, rslora", [
    ("nano", ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, False),
    ("nano", ["q_proj", "v_proj"], 8, 16.0, True),
    ("nano", ["o_proj", "k_proj"], 2, 3.0, False),
    ("glm45", ["q_proj", "k_proj", "v_proj", "o_proj"], 16, 32.0, False),
    ("air", ["k_proj", "o_proj", "q_proj"], 4, 4.0, True),
])
def test_peft_loads_our_adapter_and_means_the_same(tmp_path, checkpoints, ids, monkeypatch, shape, targets, rank,
                                                   alpha, rslora):
    """PeftModel over transformers' Glm4Moe with our adapter file gives our model's logits with the adapter hooked
    in, and with it merged into the weights (within 1e-4, fp32): on the embedded model and on random GLM-4.5- and
    Air-shaped checkpoints; every token before the first that a router sends within 1e-5 of a tie (at least half of
    them)."""
    directory = EMBEDDED_MODEL if shape == "nano" else checkpoints(shape)
    if shape != "nano":  # token ids within the random checkpoints' vocabulary
        ids = torch.randint(0, 200, (24,), generator=torch.Generator().manual_seed(0))
    model = load_checkpoint(directory)
    base = _ours(model, ids)
    adapter = _random_adapter(model, targets, rank, alpha, rslora).attach()
    hooked = _ours(model, ids)
    rows = _rows_before_router_ties(model, ids, monkeypatch)
    assert rows >= len(ids) // 2
    write_adapter(adapter, tmp_path, str(EMBEDDED_MODEL))
    adapter.detach()
    adapter.merge_into()
    merged = _ours(model, ids)

    reference = peft.PeftModel.from_pretrained(_hf_model(directory), tmp_path).eval()
    with torch.no_grad():
        theirs = reference(ids[None]).logits[0]
    assert (hooked - base).abs().max() > 1e-3  # the adapter changes the logits
    assert (hooked[:rows] - theirs[:rows]).abs().max() < 1e-4
    assert (merged[:rows] - hooked[:rows]).abs().max() < 1e-4


def test_mlp_targets_equal_their_deltas_merged_into_transformers(tmp_path, ids):
    """Dense-MLP and shared-expert LoRA (which peft 0.21 with transformers 5 does not apply to Glm4Moe): our
    hooked model equals transformers' with scale·B·A added to each target's weight by hand."""
    model = load_checkpoint(EMBEDDED_MODEL)
    adapter = _random_adapter(model, ["gate_proj", "up_proj", "down_proj", "q_proj"], 4, 8.0, False).attach()
    hooked = _ours(model, ids)
    write_adapter(adapter, tmp_path, str(EMBEDDED_MODEL))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in tensors  # the dense layer
    assert "base_model.model.model.layers.1.mlp.shared_experts.down_proj.lora_B.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    reference = _hf_model()
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                weights[f"{module}.weight"] += 2.0 * tensors[key.replace("lora_A", "lora_B")] @ a
        theirs = reference(ids[None]).logits[0]
    assert (hooked - theirs).abs().max() < 1e-4


def _cli_args(data, output, steps, *extra):
    return ["finetune", "--data", str(data), "--eval-fraction", "0.25", "--output", str(output), "--max-steps",
            str(steps), "--batch-size", "4", "--lr", "3e-3", "--rank", "4", "--seed", "5", "--save-steps", "2",
            "--eval-steps", "100", "--no-progress", *extra]


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("example"), 32, 8, seed=1, thinking_share=1.0)[0]


def test_glmserve_finetune_writes_an_adapter_peft_loads(tmp_path, example_data, ids):
    assert cli_main(_cli_args(example_data, tmp_path, 4)) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (config["r"], config["task_type"], config["base_model_name_or_path"]) == (4, "CAUSAL_LM",
                                                                                     str(EMBEDDED_MODEL))
    log = [json.loads(line) for line in (tmp_path / "finetune_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 4
    assert log[-1]["heldout_loss"] < log[0]["heldout_loss"] - 0.1

    model = load_checkpoint(EMBEDDED_MODEL)
    adapter_from_directory(model, tmp_path).attach()
    reference = peft.PeftModel.from_pretrained(_hf_model(), tmp_path).eval()
    with torch.no_grad():
        theirs = reference(ids[None]).logits[0]
    assert (_ours(model, ids) - theirs).abs().max() < 1e-4


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, example_data, monkeypatch):
    """Stopped after its step-2 checkpoint and resumed with --resume, a run writes the adapter a 4-step run writes:
    the optimizer state, the step and the batch order come back."""
    assert cli_main(_cli_args(example_data, tmp_path / "straight", 4)) == 0
    save = finetune_train._save_state

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_train, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli_main(_cli_args(example_data, tmp_path / "resumed", 4))
    monkeypatch.setattr(finetune_train, "_save_state", save)
    from safetensors.torch import load_file

    interrupted = load_file(tmp_path / "resumed" / "checkpoint" / "adapter_model.safetensors")
    assert cli_main(_cli_args(example_data, tmp_path / "resumed", 4, "--resume")) == 0
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)
    assert any((interrupted[k] - straight[k]).abs().max() > 1e-4 for k in straight)  # step 2 is not step 4


def test_bad_data_is_a_clear_cli_error(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit) as exit_:
        cli_main(["finetune", "--data", str(data), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"{data}:1: no assistant message to train on" in capsys.readouterr().err


# The CI-sized worked example: 24 steps of 8 conversations, then greedy generation through the engine on 24 held-out
# problems. The base model never answers in the style (0%); this run reached 83% when measured, the longer run in
# README 97.5%. Margin stated: at least 40 points.
EXAMPLE_MARGIN = 0.4


def test_worked_example_teaches_the_answer_style(tmp_path):
    train, heldout = write_data(tmp_path, 200, 24, seed=0, thinking_share=1.0)
    finetune_train.finetune(finetune_train.parse_args(
        ["--data", str(train), "--eval-data", str(heldout), "--output", str(tmp_path / "adapter"), "--max-steps",
         "24", "--lr", "3e-3", "--eval-steps", "100", "--save-steps", "100", "--no-progress"]))
    before, after, replies = side_by_side(EMBEDDED_MODEL, heldout, tmp_path / "adapter")
    assert after >= before + EXAMPLE_MARGIN, (before, after, replies)
