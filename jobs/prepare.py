"""``python -m jobs.prepare --input URI [--input URI …] --output URI [--config FILE] [--set key=value …] [--dry-run]``

Turns raw image, audio and 3D collections into resolution-bucketed WebDataset shards with a manifest (docs/curation.md).
Resumable: a rerun skips finished work and never duplicates a sample.
"""

from __future__ import annotations

import logging

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from pipelines.config import PrepareConfig

log = logging.getLogger("jobs.prepare")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("jobs.prepare", __doc__.split("\n\n")[1], PrepareConfig,
                         set_example="bucket.image.max_patches=1024")
    parser.add_argument("--input", action="append", metavar="URI",
                        help="folder, glob, list file (.parquet/.csv/.jsonl) or WebDataset tar; repeatable")
    parser.add_argument("--output", metavar="URI", help="output folder: local path or s3://bucket/prefix")
    parser.add_argument("--dashboard", action="store_true",
                        help="start the Ray dashboard with the local cluster (off: it costs a short job about 2 "
                             "CPU-seconds; a cluster joined through RAY_ADDRESS keeps its own)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    # base: the full default tree, so that `--set encode.vae_resources.num_gpus=1` keeps that section's own defaults
    # (actor pools: 0.5 CPU) instead of rebuilding it from the Resources class defaults
    config = resolve_config(PrepareConfig, args, {"inputs": args.input, "output": args.output},
                            base=PrepareConfig()).validate()

    from jobs.runtime import check_job_path
    from pipelines.io import resolve_storage
    from pipelines.plan import build_plan, run_prepare, summary_table

    check_job_path(config.output, "--output")

    if args.dry_run:
        print(build_plan(config, resolve_storage("s3://", config.storage)).describe())
        return 0

    from jobs.runtime import init_ray

    init_ray(dashboard=args.dashboard)
    stats = run_prepare(config)
    print(summary_table(stats))
    return 0


if __name__ == "__main__":
    run_main(main)
