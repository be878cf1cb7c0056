"""Training Next-DiT with Ray Train (V2) + DeepSpeed ZeRO-3 over bucketed shards (docs/training.md).

config.py (TrainConfig tree) · data.py (deterministic resumable bucketed loader) · parallelize.py (LoRA, activation
checkpointing, DeepSpeed, EMA) · loop.py (per-worker loop and tasks) · metrics.py · checkpointing.py · lora.py ·
trainer.py (driver: validation, TorchTrainer).
"""
