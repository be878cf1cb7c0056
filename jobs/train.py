"""``python -m jobs.train --data URI --storage URI --workers N --preset NAME --steps N [--text-encoder PATH] [--gpu]
[--config FILE] [--set key=value …] [--dry-run]``

Trains Next-DiT on the shards of ``jobs.prepare`` with Ray Train + DeepSpeed ZeRO-3 (docs/training.md). Rerunning the
same command (same --storage and run.name) resumes from the latest checkpoint, on any number of workers.
"""

from __future__ import annotations

import logging

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.training.config import TrainJobConfig
from models.presets import PRESETS

log = logging.getLogger("jobs.train")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("jobs.train", __doc__.split("\n\n")[1], TrainJobConfig, set_example="optim.lr=2e-4")
    parser.add_argument("--data", metavar="URI", help="a jobs.prepare output folder (local or s3://)")
    parser.add_argument("--storage", metavar="URI", help="where checkpoints go: local path or s3://bucket/prefix")
    parser.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (one per GPU)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model size preset")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train to")
    parser.add_argument("--text-encoder", metavar="PATH", help="text encoder folder (shards without text features)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, bf16")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    config = resolve_config(TrainJobConfig, args, {
        "data.uri": args.data, "run.storage": args.storage, "scaling.workers": args.workers,
        "model.preset": args.preset, "train.steps": args.steps, "data.text_encoder": args.text_encoder,
        "scaling.gpu": args.gpu,
    })

    from jobs.runtime import check_job_path
    from jobs.training.driver import describe, train, validate

    check_job_path(config.run.storage, "--storage")
    from jobs.training.metrics import describe_wandb
    from models.storage import join

    if args.dry_run:
        print(describe(config, validate(config, write_probe=False)))
        print(describe_wandb(config.logging.wandb, join(config.run.storage, config.run.name), config.run.name))
        return 0
    result = train(config)
    print(f"done: {result.metrics}; checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    run_main(main)
