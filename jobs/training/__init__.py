"""Training Next-DiT with Ray Train (V2) + DeepSpeed ZeRO-3 over bucketed shards (docs/training.md).

driver.py (the driver: validation, the TorchTrainer) · config.py (the TrainJobConfig tree) · data.py (deterministic
resumable bucketed loader) · tasks.py (the TASKS registry) · parallelize.py (LoRA, activation checkpointing, DeepSpeed,
EMA) · loop.py (the per-worker loop) · metrics.py · checkpointing.py · lora.py.
"""
