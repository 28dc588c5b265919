"""LoRA fine-tuning on the CPU: `glmserve finetune` (train.py), its data (data.py), the LoRA layers (lora.py), the
PEFT adapter files (adapter.py) and the worked example (example.py)."""
