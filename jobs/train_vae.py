"""``python -m jobs.train_vae --data DIR --output DIR``: train a small diffusers AutoencoderKL with Ray Train.

For the embedded demo and for users who need a VAE for a new domain at small scale. See jobs/vae_training.py.
"""

from __future__ import annotations

import logging

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.vae_training import TrainVAEConfig, list_images, run

log = logging.getLogger("jobs.train_vae")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.train_vae", __doc__, TrainVAEConfig, set_example="kl_weight=1e-5")
    parser.add_argument("--data", help="folder of images")
    parser.add_argument("--output", help="where to save the AutoencoderKL folder (local or s3://)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--gpu", action="store_true", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    cfg = resolve_config(TrainVAEConfig, args, {"data": args.data, "output": args.output, "workers": args.workers,
                                                "steps": args.steps, "use_gpu": args.gpu})
    list_images(cfg.data)
    if args.dry_run:
        log.info("config valid; %d images", len(list_images(cfg.data)))
        return 0
    metrics = run(cfg)
    log.info("trained VAE saved to %s (final metrics %s)", cfg.output, metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
