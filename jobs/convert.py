"""``python -m jobs.convert --to {ours,official,diffusers} SRC DST``: convert Next-DiT checkpoints in every direction.

SRC may be our model folder, an official release (folder with consolidated.* + model_args.pth, or the consolidated file)
or a diffusers LuminaNextDiT2DModel folder (or a pipeline folder with transformer/); local or s3://.
"""

from __future__ import annotations

import logging

from jobs.cli import make_parser, run_main, setup_logging
from models.checkpoint import FORMATS, CheckpointError, convert_checkpoint

log = logging.getLogger("jobs.convert")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.convert", __doc__)
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("src", help="source checkpoint (folder, file or s3:// URL)")
    parser.add_argument("dst", help="destination folder (local or s3://)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = convert_checkpoint(args.src, args.dst, args.to)
    except (CheckpointError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %s checkpoint (%d layers, dim %d) to %s", args.to, cfg.n_layers, cfg.dim, args.dst)
    return 0


if __name__ == "__main__":
    run_main(main)
