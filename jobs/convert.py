"""``python -m jobs.convert --to {ours,official,diffusers} SRC DST``: convert Next-DiT checkpoints in every direction.

SRC may be our model folder, an official release (folder with consolidated.* + model_args.pth, or the consolidated file)
or a diffusers LuminaNextDiT2DModel folder (or a pipeline folder with transformer/); local or s3://.
"""

from __future__ import annotations

import logging

from jobs.cli import make_parser, run_main, setup_logging
from models.checkpoint import FORMATS, fetched, has_ema, read_checkpoint, write_checkpoint
from models.formats import CheckpointError
from models.nextdit import NextDiT
from models.presets import NextDiTConfig

log = logging.getLogger("jobs.convert")


def convert_checkpoint(src: str, dst: str, fmt: str) -> NextDiTConfig:
    """Rewrite any supported checkpoint (local or s3://) in format ``fmt`` at ``dst``; EMA weights travel along
    (diffusers has no slot for them). Our folder's metadata (text encoder / VAE references) is kept when writing ours."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with fetched(src) as local:  # fetched once for both the raw and the EMA weights
        cfg, state, metadata = read_checkpoint(local)
        ema_state = read_checkpoint(local, ema=True).state if has_ema(local) and fmt != "diffusers" else None
    NextDiT.from_state_dict(cfg, state, device="meta")  # validates keys and shapes before anything is written
    write_checkpoint(cfg, state, dst, fmt, ema_state, metadata)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.convert", __doc__)
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("src", help="source checkpoint (folder, file or s3:// URL)")
    parser.add_argument("dst", help="destination folder (local or s3://)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from jobs.runtime import check_job_path

    check_job_path(args.dst, "dst")
    try:
        cfg = convert_checkpoint(args.src, args.dst, args.to)
    except (CheckpointError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %s checkpoint (%d layers, dim %d) to %s", args.to, cfg.n_layers, cfg.dim, args.dst)
    return 0


if __name__ == "__main__":
    run_main(main)
