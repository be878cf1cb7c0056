"""Image feature extractors for the metrics of ``models.image_metrics``, each loaded from a local path (or an ``s3://``
URL, fetched once into the local cache): nothing is downloaded at run time.

    load_image_features(path)      a weights file (.pth / .pt)  → ``InceptionFeatures``: FID, KID, IS
                                   a transformers model folder  → ``TransformersImageFeatures``: FD_DINOv2, FD_CLIP, KID
    ClipScorer(folder)             a transformers CLIPModel folder → the CLIP score of image–prompt pairs

Every extractor takes images as uint8 tensors (B, 3, H, W) and returns ``{"features": (B, D)}`` (plus ``"logits"``
(B, K) where it has a classifier, and ``"spatial"`` (B, 2023), the sFID features: the Inception network), float32. ``id`` names it in cache keys and reports.

FID's Inception is torch-fidelity's port of the TensorFlow graph the FID authors published
(``pt_inception-2015-12-05``, TF 1.x-exact bilinear resize to 299²), from the weights file of torch-fidelity
(``weights-inception-2015-12-05-6726825d.pth``) or of pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``, the same
layer names): the networks behind torchmetrics' and torch-fidelity's FID, and close to the ADM suite's TensorFlow one
(docs/evaluation.md#extractors).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

INCEPTION_FEATURES = ("2048", "logits_unbiased")  # torch-fidelity's names: pool_3 features, fc logits without bias
INCEPTION_NAME = "inception-v3-compat"
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of mixed_6/conv (Nash et al. 2021, the ADM suite), 17·17·7 = 2023
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def fingerprint(path: str) -> str:
    """A short id of a weights file or model folder: the name, and a hash of its files' names and sizes (cheap, and
    enough to tell two checkpoints apart in a statistics cache; not a content hash)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(root) if p != root else p.name}\0{p.stat().st_size}\n".encode())
    return f"{root.name}@{digest.hexdigest()[:12]}"


class ImageFeatures(torch.nn.Module):
    """uint8 images (B, 3, H, W) → ``{"features": (B, D)[, "logits": (B, K), "spatial": (B, 2023)]}``; ``id``, ``dim``,
    ``has_logits``, ``has_spatial``."""

    id: str = ""
    dim: int = 0
    has_logits: bool = False
    has_spatial: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ----------------------------------------------------------------------------------------------------------- Inception


def _inception_state(state: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict of torch-fidelity's Inception from a loaded weights file, and whether it had to be changed:
    ``module.`` prefixes (DataParallel) dropped, torchvision's auxiliary classifier (``AuxLogits.*``) dropped, missing
    BatchNorm ``num_batches_tracked`` counters (files from before torch 0.4.1) added."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not an Inception state dict (a dict of tensors); give the FID Inception weights "
                         "file (pt_inception-2015-12-05-6726825d.pth or weights-inception-2015-12-05-6726825d.pth)")
    fixed = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith(
        "AuxLogits.")}
    for key in [k for k in fixed if k.endswith(".bn.running_mean")]:
        fixed.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    return fixed, fixed.keys() != state.keys()


class InceptionFeatures(ImageFeatures):
    """FID's Inception-v3 (torch-fidelity's ``FeatureExtractorInceptionV3``) from a local weights file: 2048-d pool
    features, the 1008-class logits (without the fc bias, as torch-fidelity's IS uses them) and sFID's spatial
    features (the first 7 channels of the TF graph's ``mixed_6/conv``, 2023-d; Nash et al. 2021, "Generating images
    with sparse representations", as the ADM suite takes them). Any input size: the
    network resizes to 299² itself, with TensorFlow 1.x's bilinear rule, as the reference implementation did."""

    has_logits = True
    has_spatial = True
    dim = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from models.storage import local_path

        path = original = local_path(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no Inception weights file at {weights_path}")
        # weights_only: a plain tensor dict or an error, never pickled code (torch-fidelity loads the file without it)
        state, changed = _inception_state(torch.load(path, map_location="cpu", weights_only=True), weights_path)
        with tempfile.TemporaryDirectory(prefix="inception-") as tmp:
            if changed:  # torch-fidelity only loads from a path: hand it the normalised copy
                path = os.path.join(tmp, "inception.pth")
                torch.save(state, path)
            try:
                self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, list(INCEPTION_FEATURES),
                                                       feature_extractor_weights_path=path)
            except RuntimeError as exc:  # load_state_dict's missing / unexpected keys
                raise ValueError(f"{weights_path} does not fit FID's Inception-v3: {exc}") from exc
        self.id = f"{INCEPTION_NAME}:{fingerprint(original)}"
        # sFID's layer: the TF graph's 11 "mixed" blocks are torchvision's Mixed_5b … Mixed_7c in order (mixed_3 is
        # the 35→17 reduction Mixed_6a), so mixed_6 is Mixed_6d, and its "conv" the 1×1 branch, whose output in the
        # graph is the ReLU after conv and batchnorm (mixed_6/conv/Conv2D, …/batchnorm, then mixed_6/conv): the
        # output of torch-fidelity's BasicConv2d Mixed_6d.branch1x1 (weights converted by the same names).
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # the ADM suite keeps the first 7 of 192 channels of the NHWC tensor and flattens it (17·17·7 = 2023): the
        # same channels, flattened in TF's (height, width, channel) order so ADM's mu_s / sigma_s line up
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images.to(self.device, torch.uint8))
        spatial, self._spatial = self._spatial, None
        return {"features": pool.float(), "logits": logits.float(), "spatial": spatial}


# -------------------------------------------------------------------------------------------------------- transformers


class Preprocess:
    """uint8 (B, 3, H, W) → normalised float pixels the way the folder's ``preprocessor_config.json`` says: resize
    the shorter side to ``size`` (bicubic, antialiased), centre-crop ``crop`` × ``crop``, ``(x − mean) / std``.
    Without that file: the config's ``image_size`` for both, and CLIP's or ImageNet's mean and std. Done in torch on
    the model's device (the processors' PIL path gives the same within resampling differences, the same on both sides
    of a comparison)."""

    def __init__(self, folder: str, config: Any):
        processor = {}
        file = Path(folder) / "preprocessor_config.json"
        if file.exists():
            processor = json.loads(file.read_text())
        vision = getattr(config, "vision_config", None) or config
        default_side = int(getattr(vision, "image_size", 224))
        size = processor.get("size", default_side)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", default_side), size.get("width", default_side))
        crop = processor.get("crop_size", size) if processor.get("do_center_crop", True) else size
        if isinstance(crop, dict):
            crop = min(crop.get("height", size), crop.get("width", size))
        clip_like = "clip" in config.model_type
        self.size, self.crop = int(size), int(crop)
        self.mean = torch.tensor(processor.get("image_mean", CLIP_MEAN if clip_like else IMAGENET_MEAN))
        self.std = torch.tensor(processor.get("image_std", CLIP_STD if clip_like else IMAGENET_STD))

    def __call__(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        x = images.to(device, torch.float32) / 255
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (new[0] - self.crop) // 2, (new[1] - self.crop) // 2
        x = x[..., top: top + self.crop, left: left + self.crop]
        x = (x - self.mean.to(device)[:, None, None]) / self.std.to(device)[:, None, None]
        return x.to(dtype)


def pooled_output(output: Any) -> torch.Tensor:
    """The embedding of a transformers output: a tensor as it is (transformers 4's ``get_image_features``), else the
    pooled output (5's ``get_image_features`` puts the projected embedding there; DINOv2's is its normalised CLS
    token), else the first token of the last hidden state."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output.last_hidden_state[:, 0]


class TransformersImageFeatures(ImageFeatures):
    """Features of any transformers vision model folder: a model with ``get_image_features`` (CLIP, SigLIP: the
    projected image embedding), else its pooled output (DINOv2: the CLS token after the last LayerNorm, the features of
    FD_DINOv2, Stein et al. 2023), else its first token."""

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from models.storage import local_path

        path = local_path(folder)
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{folder}: no config.json; give a transformers model folder (CLIP, DINOv2, …) "
                                    "or the FID Inception weights file")
        config = AutoConfig.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.preprocess = Preprocess(path, config)
        self.id = f"{config.model_type}:{fingerprint(path)}"
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 3, self.preprocess.crop, self.preprocess.crop, dtype=torch.uint8))
                           ["features"].shape[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = self.preprocess(images, self.device, next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
        else:
            out = self.model(pixel_values=pixels)
        return {"features": pooled_output(out).float()}


def load_image_features(path: str) -> ImageFeatures:
    """The extractor at ``path``: a weights file (.pth / .pt / .bin) → FID's Inception; a folder → transformers."""
    from models.storage import is_remote

    name = str(path).rstrip("/")
    if name.endswith((".pth", ".pt", ".bin")) or (not is_remote(name) and os.path.isfile(name)):
        return InceptionFeatures(name)
    return TransformersImageFeatures(name)


# ---------------------------------------------------------------------------------------------------------- CLIP score


class ClipScorer(torch.nn.Module):
    """The CLIP score of image–prompt pairs with a transformers CLIP folder (model, tokenizer, and optionally its
    ``preprocessor_config.json``): ``models.image_metrics.clip_score`` of the projected image and text embeddings."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from models.storage import local_path

        path = local_path(folder)
        config = AutoConfig.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"{folder} is a {type(self.model).__name__}, which has no image and text towers; the "
                             "CLIP score needs a CLIPModel folder")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        text = getattr(config, "text_config", config)
        self.max_length = int(getattr(text, "max_position_embeddings", 77))
        self.preprocess = Preprocess(path, config)
        self.id = f"{config.model_type}:{fingerprint(path)}"

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        pixels = self.preprocess(images, device, next(self.model.parameters()).dtype)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        image = pooled_output(self.model.get_image_features(pixel_values=pixels))
        text = pooled_output(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"]))
        return image.float(), text.float()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) CLIP scores of images[i] with prompts[i]."""
        from models.image_metrics import clip_score

        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return clip_score(*self.embed(images, prompts))
