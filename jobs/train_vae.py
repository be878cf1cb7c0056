"""``python -m jobs.train_vae --data DIR --output DIR``: train a VAE with Ray Train.

``--modality image`` (the default): a small diffusers AutoencoderKL on a folder of images, for the embedded demo and
for users who need a VAE for a new domain at small scale (jobs/vae_training.py). ``--modality audio``: the paper's mel
VAE (paper §5.2) with its multi-window discriminator, on a folder of audio files or the audio shards of a jobs.prepare output
(jobs/audio_vae_training.py; ``--modality audio --help`` lists its config fields).
"""

from __future__ import annotations

import argparse
import logging

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.runtime import check_job_path
from jobs.vae_training import TrainVAEConfig, list_images, run

log = logging.getLogger("jobs.train_vae")
MODALITIES = ("image", "audio")
AUDIO_ONLY = {"preset": "--preset", "crop_frames": "--crop-frames", "disc_start": "--disc-start"}


def main(argv: list[str] | None = None) -> int:
    first = argparse.ArgumentParser(add_help=False)  # the modality picks the config class the parser shows
    first.add_argument("--modality", default="image")
    audio = first.parse_known_args(argv)[0].modality == "audio"
    if audio:
        from jobs.audio_vae_training import TrainAudioVAEConfig as config_cls
    else:
        config_cls = TrainVAEConfig
    parser = make_parser("python -m jobs.train_vae", __doc__, config_cls, set_example="kl_weight=1e-5" if not audio
                         else "loss.disc_start=20001")
    parser.add_argument("--modality", choices=MODALITIES, default="image",
                        help="image: a small AutoencoderKL (default); audio: the mel VAE")
    parser.add_argument("--data", help="folder of images; audio: a folder of audio files or a jobs.prepare output")
    parser.add_argument("--output", help="where to save the VAE folder (local or s3://)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--gpu", action="store_true", default=None)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int, help="per worker")
    parser.add_argument("--kl-weight", type=float)
    parser.add_argument("--preset", help="audio: the mel VAE's size, tiny or paper (default)")
    parser.add_argument("--crop-frames", type=int, help="audio: mel frames per random crop (default 624)")
    parser.add_argument("--disc-start", type=int, help="audio: the step from which the discriminator trains "
                                                       "(default 50001)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    flags = {"data": args.data, "output": args.output, "workers": args.workers, "steps": args.steps,
             "use_gpu": args.gpu, "lr": args.lr, "batch_size": args.batch_size}
    if not audio:
        given = [flag for name, flag in AUDIO_ONLY.items() if getattr(args, name) is not None]
        if given:
            from models.config_io import ConfigError

            raise ConfigError(f"{', '.join(given)}: only with --modality audio")
        cfg = resolve_config(TrainVAEConfig, args, {**flags, "kl_weight": args.kl_weight})
        check_job_path(cfg.output, "--output")
        list_images(cfg.data)
        if args.dry_run:
            log.info("config valid; %d images", len(list_images(cfg.data)))
            return 0
        metrics = run(cfg)
        log.info("trained VAE saved to %s (final metrics %s)", cfg.output, metrics)
        return 0
    return train_audio(args, flags)


def train_audio(args: argparse.Namespace, flags: dict) -> int:
    from jobs import audio_vae_training as audio

    cfg = resolve_config(audio.TrainAudioVAEConfig, args, {
        **flags, "crop_frames": args.crop_frames, "model.preset": args.preset, "loss.kl_weight": args.kl_weight,
        "loss.disc_start": args.disc_start})
    check_job_path(cfg.output, "--output")
    sources = audio.find_sources(cfg)
    if args.dry_run:
        log.info("config valid; %s", sources.describe())
        return 0
    history = audio.run(cfg, sources)
    skipped = history["data"]["skipped"]
    for item in skipped:
        log.warning("skipped %s: %s", item["source"], item["reason"])
    log.info("trained mel VAE saved to %s: %d clips (%d unreadable source(s) skipped), final rec_l1 %.4f, "
             "scaling_factor %.4f; every step in %s/%s", cfg.output, history["data"]["clips"], len(skipped),
             history["steps"][-1]["rec_l1"], history["scaling_factor"], cfg.output.rstrip("/"), audio.HISTORY_FILE)
    return 0


if __name__ == "__main__":
    run_main(main)
