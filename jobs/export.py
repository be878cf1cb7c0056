"""``python -m jobs.export CHECKPOINT_URI OUT_DIR [--ema/--no-ema] [--push-to-hub ORG/NAME [--private]]``

Turns a training checkpoint (a Ray Train checkpoint folder, or a run folder: its latest checkpoint; local or s3://) into
a model folder (docs/architecture.md#model-folder): config.json + model.safetensors (raw weights) +
ema.safetensors, with the
text-encoder / VAE references, loadable by NextDiT.from_pretrained and the Sampler and convertible with jobs.convert.
A LoRA run exports a peft adapter folder instead (EMA adapters under ema/), applied on top of model.init_from.
``--push-to-hub`` then uploads the folder as a Hub model repo (docs/architecture.md#model-paths).
"""

from __future__ import annotations

import argparse
import logging

from jobs.cli import make_parser, run_main, setup_logging

log = logging.getLogger("jobs.export")


def references(train_config: dict, state: dict | None = None, text: bool = True) -> dict:
    """The model folder's metadata from the run: text-encoder and VAE references (the config's ``model.*``, then
    ``data.*``, then the encoders jobs.prepare recorded for the shards — with the VAE's scale and shift and the text
    encoder's settings, so the folder generates with no extra flags), class names, and how it was trained. A model
    that is not text-conditioned (``text``) gets no text encoder, even where its shards carry text features."""
    model, data = train_config.get("model", {}), train_config.get("data", {})
    recorded = (state or {}).get("encoders") or {}
    meta: dict = {}
    text_encoder = _reference(model.get("text_encoder") or data.get("text_encoder"), recorded.get("text_encoder"),
                              ("path", "kind", "layer", "max_length", "pad_to_multiple_of"))
    # data.vae encodes online (the shards hold images); otherwise the latents were made by the recorded VAE
    vae = _reference(model.get("vae") or data.get("vae"), recorded.get("vae"),
                     ("path", "scaling_factor", "shift_factor"))
    if text_encoder and text:
        meta["text_encoder"] = text_encoder
    if vae:
        meta["vae"] = vae
    if model.get("class_names"):
        meta["class_names"] = list(model["class_names"])
    if state and "training" in state:
        meta["training"] = dict(state["training"])
    return meta


def _reference(given: str | None, record: dict | None, keys: tuple[str, ...]) -> dict | None:
    """A component reference for the model folder: the recorded encoder (with its settings) when none is given or the
    given one is the same path, else the given path."""
    if record and (not given or given == record.get("path")):
        return {k: record[k] for k in keys if record.get(k) is not None}
    return {"path": given} if given else None


def export(checkpoint_uri: str, out_dir: str, ema: bool = True) -> str:
    """Write the model folder; returns the checkpoint folder that was exported."""
    import json
    import os

    from jobs.training import checkpointing
    from models.checkpoint import write_checkpoint
    from models.config_io import from_dict
    from models.nextdit import NextDiT
    from models.presets import NextDiTConfig
    from models.storage import local_copy, staged_output

    uri = checkpointing.latest_checkpoint(checkpoint_uri)
    log.info("exporting %s", uri)
    with local_copy(uri) as folder:
        raw, ema_state, state = checkpointing.consolidate(folder)
        with open(os.path.join(folder, checkpointing.CONFIG_FILE)) as f:
            train_config = json.load(f)
    cfg = from_dict(NextDiTConfig, state["model"])
    if ema and ema_state is None:
        log.warning("the checkpoint has no EMA (ema.enabled was off): exporting raw weights only")
    ema_state = ema_state if ema else None

    if state.get("lora"):
        with staged_output(out_dir) as local:
            _write_adapter(train_config, raw, ema_state, local)
    else:
        NextDiT.from_state_dict(cfg, raw, device="meta")  # validates names and shapes before anything is written
        meta = references(train_config, state, text=cfg.conditioning == "text")
        write_checkpoint(cfg, raw, out_dir, "ours", ema_state, meta)
    return uri


def _write_adapter(train_config: dict, raw: dict, ema_state: dict | None, out_dir: str) -> None:
    import os

    from jobs.training.config import LoRAConfig
    from jobs.training.lora import save_adapter
    from models import NextDiT
    from models.config_io import from_dict

    lora = from_dict(LoRAConfig, train_config["lora"])
    base = train_config["model"]["init_from"]
    save_adapter(NextDiT.from_pretrained(base), lora, raw, out_dir)
    if ema_state is not None:
        save_adapter(NextDiT.from_pretrained(base), lora, ema_state, os.path.join(out_dir, "ema"))


def check_hub_repo(repo: str) -> None:
    """Refuse, before anything is exported, a push that cannot happen: a malformed repo id, or HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    from models.config_io import ConfigError
    from models.storage import HUB_ID

    match = HUB_ID.match(repo)
    if not match or match["revision"]:
        raise ConfigError(f"--push-to-hub {repo!r} is not a Hub repo id (org/name)")
    if constants.is_offline_mode():
        raise ConfigError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set in this environment")


def push_to_hub(out_dir: str, repo: str, private: bool = False) -> str:
    """Upload the exported folder ``out_dir`` (local or s3://) as the model repo ``repo``, created if missing; returns
    the commit's URL. The token is the environment's (HF_TOKEN or a saved login), never a flag. A refusal is a
    RuntimeError naming the repo (and, when it is the token's, HF_TOKEN): huggingface_hub's own names only a URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from models.storage import local_copy

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        with local_copy(out_dir) as folder:
            info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=folder,
                                     commit_message=f"jobs.export of {out_dir}")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = (f": the token (HF_TOKEN, else a saved `hf auth login`) is missing, invalid or cannot write to {repo}"
                if status in (401, 403) else "")
        raise RuntimeError(f"pushing {out_dir} to the Hub repo {repo} failed (HTTP {status}){hint}; the exported "
                           f"folder is kept") from exc
    return str(info)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("jobs.export", __doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="training checkpoint folder or run folder (local or s3://)")
    parser.add_argument("out_dir", help="model folder to write (local or s3://)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the EMA weights (ema.safetensors); --no-ema: raw weights only")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME",
                        help="then upload the folder as this Hugging Face Hub model repo (token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from jobs.runtime import check_job_path

    check_job_path(args.out_dir, "out_dir")
    if args.push_to_hub:
        check_hub_repo(args.push_to_hub)
    try:
        uri = export(args.checkpoint, args.out_dir, ema=args.ema)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %s from %s", args.out_dir, uri)
    if args.push_to_hub:
        log.info("pushed to the Hub: %s", push_to_hub(args.out_dir, args.push_to_hub, args.private))
    return 0


if __name__ == "__main__":
    run_main(main)
