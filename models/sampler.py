"""The ``Sampler``: prompts → images and metadata. Shared by ``jobs.generate`` and the Serve replicas.

Pipeline per request (paper §2.3, §2.2; docs/official-formats.md#flow-matching-and-sampling,
docs/design-decisions.md#default-sampler, docs/design-decisions.md#time-aware-context-drop):
1. the prompt and the negative prompt (default "") are encoded by the text encoder (Gemma hidden_states[-2], right padding);
2. the initial noise z ~ N(0, I) of shape (C, H/8, W/8) comes from the request's own ``torch.Generator(seed)`` on the CPU;
3. the flow ODE is integrated from t = 0 to 1 on the schedule's grid with the chosen solver; every evaluation is one
   [cond; uncond] forward with CFG, RoPE scaling and Context Drop recomputed from that evaluation's t;
4. the VAE decodes the latent to an image.

Class-conditional models (``conditioning == "class"``, e.g. the ImageNet presets) need no text encoder: step 1 becomes
choosing a class label — ``GenerationRequest.class_label``, else the prompt read as a class index ("207"), else the prompt
looked up (case-insensitively) in the ``class_names`` list of the model folder's metadata — and the unconditional branch
of CFG is the null class (index ``num_classes``, trained by label dropout like captions), so such models take no negative
prompt.

Batching and determinism: compatible requests (same size; same caption length — the request's own, the longer of its
prompt's and, when guided, its negative prompt's encoded lengths; class requests have none, so they never share a solve
with text requests —; same solver, schedule, steps, guidance, cfg_channels, RoPE and Context Drop settings) share one
batched ODE solve of ``batch_size`` slots. What holds, and why (docs/sampling.md, "Determinism and batching"):

- The kernels that run never depend on the batch-mates. With ``pad_batches`` (default) every solve has exactly
  ``batch_size`` slots, so every op's shapes follow from the request's group alone; prompts are encoded and images
  decoded one at a time; the noise comes from each request's own generator; and every text solve right-pads the
  captions with ``CAPTION_PAD`` masked positions, so the caption mask is never all-true and attention always takes the
  masked path (``NextDiT.forward`` and ``attention`` run the unmasked kernels — flash SDPA on CUDA — when nothing is
  padded, which would otherwise hinge on whether every batch-mate's prompt fills the length).
- So in the same slot a request's latent and image are bit-identical whatever the other slots hold (one machine, one
  torch/BLAS build and thread count): a matmul row depends on that row's data and index, never on the other rows'
  values. A request alone, or first of its group, is in slot 0.
- Across slots the bits are not promised: a BLAS may round a row according to its index. Seen here: MKL sgemm on an AMD
  EPYC with 2 threads splits the 2·batch_size rows of the per-sample linears (timestep MLP, adaLN) between the threads
  and computes the remainder with another kernel, so rows 4–5 of a 6-row product differ from rows 0–3 in the last bit
  (3.6e-7 in ``t_embedder.mlp.0``, 7.7e-7 in the final latent); other CPUs and thread counts split differently. The
  latent then agrees to float rounding and every 8-bit pixel to within one level (nearly always exactly: a pixel moves
  only when its value lies within ~1e-4 of a rounding boundary).
- The batch size itself sets the rows of every matmul, so bits match only between samplers of the same ``batch_size``;
  with ``pad_batches=False`` the last, shorter solve of a group has other shapes and the first point no longer holds.
  Adaptive solvers (dopri5) choose their steps from the whole state's error, so they always solve one request at a
  time (slot 0).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from models import lora
from models.audio import (
    MAX_DURATION_S,
    MEL_VAES,
    ClipShape,
    check_audio_latents,
    check_duration,
    clip_shape,
    decode_audio,
    find_audio_vae,
    load_audio_vae,
)
from models.checkpoint import read_checkpoint
from models.config_io import expand_preset, from_dict, merge, to_dict
from models.flow import pad_captions, solve, velocity_fn
from models.geometry import MAX_SIDE, check_size, image_size, latent_size, pixels_per_token
from models.mel import samples_for
from models.nextdit import ContextDrop, NextDiT
from models.points import MAX_POINTS, check_points
from models.rope import RopeScaling
from models.schedules import OFFICIAL_SHIFT, ScheduleConfig, make_schedule
from models.solvers import ADAPTIVE_SOLVERS, check_solver, nfe_for
from models.text_encoder import TextEncoder, TextEncoderConfig, TextEncoderStack
from models.vae import ImageVAE, VAEConfig, images_to_uint8
from models.vocoder import GriffinLim, Vocoder, VocoderConfig, load_vocoder

CAPTION_PAD = 1  # masked caption positions added to every text solve: attention never runs unmasked (module docstring)
STEPS_MEANING = "solver steps = grid intervals (the official num_sampling_steps N is steps + 1 grid points)"


# The official demo's sampling (docs/sampling.md, "Presets"): midpoint on 30 grid
# points (29 solver steps) of the rational time shift s = 4, CFG 4 on the first 3 latent channels, the main branch's
# RoPE rule (one area factor; PI before t = 0.3, base θ·s after). ``--set sampler=official`` picks it.
SAMPLER_PRESETS: dict[str, dict] = {
    "official": {"steps": 29, "solver": "midpoint", "schedule": {"name": "rational", "shift": OFFICIAL_SHIFT},
                 "guidance": 4.0, "cfg_channels": 3, "rope": {"mode": "official_switch", "policy": "area"}},
}


@dataclass
class SamplerConfig:
    """Sampling defaults (paper: midpoint; our measured default schedule: sigmoid, docs/sampling.md). A preset name
    (``SAMPLER_PRESETS``) may stand for the whole section: ``--set sampler=official``."""

    PRESETS: ClassVar[dict[str, dict]] = SAMPLER_PRESETS

    steps: int = 10  # solver steps = grid intervals; NFE = steps × evaluations per step (midpoint: 2)
    solver: str = "midpoint"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    guidance: float = 4.0  # official default CFG scale
    cfg_channels: int | None = None  # None: guide every channel; 3: the official first-3-channels rule
    negative_prompt: str = ""
    rope: RopeScaling = field(default_factory=RopeScaling)  # time_aware, per-axis: identity at ≤ the training size
    context_drop_min_tokens: int | None = None  # None: off; else pool K/V of samples with ≥ this many image tokens
    context_drop_kernel: int = 2
    width: int | None = None  # default size in pixels; None: the model's training size
    height: int | None = None
    max_side: int = MAX_SIDE  # largest width or height a request may ask for
    duration: float | None = None  # audio models: default clip length in seconds; None: the training length
    max_duration: float = MAX_DURATION_S  # audio models: longest clip a request may ask for
    points: int | None = None  # point-cloud models: default points per cloud; None: the training density
    max_points: int = MAX_POINTS  # point-cloud models: most points a request may ask for
    max_pixels: int | None = None  # largest width × height; None: max_side² bounds it
    # FP8 (e4m3) block projections for inference (models/fp8.py): CUDA compute capability ≥ 8.9; outputs move by
    # ~1e-2 relative, the projections' matmul rate doubles on Hopper
    fp8: bool = False
    # torch.compile the transformer (default mode): the first solve of each new shape compiles (about a minute for the
    # 2B model on a GPU), later ones run the compiled graph — for long-running services and batch jobs
    compile: bool = False
    batch_size: int = 1  # requests per batched ODE solve
    pad_batches: bool = True  # pad every solve to batch_size slots: its kernels never depend on the batch-mates
    atol: float = 1e-6  # dopri5 only
    rtol: float = 1e-3

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        check_solver(self.solver)
        if self.guidance < 0:
            raise ValueError(f"guidance must be ≥ 0, got {self.guidance}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels must be ≥ 1 or null (every channel), got {self.cfg_channels}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.context_drop_kernel < 2:
            raise ValueError(f"context_drop_kernel must be ≥ 2, got {self.context_drop_kernel}")
        if self.max_side < pixels_per_token():
            raise ValueError(f"max_side must be ≥ {pixels_per_token()}, got {self.max_side}")
        if self.max_duration <= 0 or (self.duration is not None and not 0 < self.duration <= self.max_duration):
            raise ValueError(f"need 0 < duration ≤ max_duration, got {self.duration} and {self.max_duration}")
        if self.max_pixels is not None and self.max_pixels < pixels_per_token() ** 2:
            raise ValueError(f"max_pixels must be ≥ {pixels_per_token() ** 2} or null, got {self.max_pixels}")


@dataclass
class GenerationRequest:
    """One image. ``None`` fields take the sampler config's value."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None  # None: a fresh random seed, reported in the metadata
    steps: int | None = None
    solver: str | None = None
    schedule: str | ScheduleConfig | None = None
    guidance: float | None = None
    rope_scaling: RopeScaling | None = None
    context_drop: ContextDrop | bool | None = None  # None: config threshold; False: off; True: on from 0 tokens
    cfg_channels: int | None = None  # None: config (pass the latent channel count to force every channel)
    class_label: int | None = None  # class-conditional models only; None: the prompt names the class (index or name)
    duration: float | None = None  # audio models only: seconds (None: the config's); image models take width/height
    # the text of a text-encoder stack's structured-caption part (the audio model's T5, paper §5.2); None: the prompt
    structured_prompt: str | None = None
    points: int | None = None  # point-cloud models only: points in the cloud (None: the config's)


@dataclass
class GenerationResult:
    image: np.ndarray | None  # H×W×3 uint8 (None without a VAE, and for audio)
    latent: torch.Tensor  # (C, H/8, W/8) fp32 on the CPU; audio: (C, rows, T) latent frames (rows: 1, or F)
    metadata: dict
    audio: np.ndarray | None = None  # audio models: mono float32 waveform in [-1, 1] at ``sample_rate``
    sample_rate: int | None = None
    mel: np.ndarray | None = None  # audio models: the decoded log-mel (n_mels, frames)
    points: np.ndarray | None = None  # point-cloud models: (N, 3) float32 coordinates


class GenerationCancelled(RuntimeError):
    """``Sampler.generate``'s ``should_stop`` said stop: the solve ended between two model evaluations."""


@dataclass(frozen=True)
class ResolvedRequest:
    """A request validated and with every default filled in (``Sampler.resolve``)."""

    index: int
    prompt: str
    negative_prompt: str
    width: int | None  # images; None for audio
    height: int | None
    latent_shape: tuple[int, int]  # the latent's (h, w); audio: (rows, latent frames)
    clip: ClipShape | None  # audio models: the clip's sizes at every stage
    seed: int
    steps: int
    solver: str
    schedule: ScheduleConfig
    guidance: float
    cfg_channels: int | None
    rope: RopeScaling
    context_drop: ContextDrop | None
    class_label: int | None  # set exactly when the model is class-conditional
    structured_prompt: str | None = None  # what a stack's structured-caption part reads (None: the prompt)

    @property
    def text(self) -> tuple[str, str]:
        """The conditional branch's texts: (prompt, structured prompt) — the text encoder's inputs and cache key."""
        return self.prompt, self.prompt if self.structured_prompt is None else self.structured_prompt

    @property
    def negative_text(self) -> tuple[str, str]:
        """The unconditional branch's texts: the negative prompt for every part of a stack."""
        return self.negative_prompt, self.negative_prompt

    def cost(self) -> int | None:
        """What one slot of this request's solve costs, in latent elements × model evaluations (× 2 with CFG, whose
        two branches run as one double batch): the unit a server prices requests in
        (docs/sampling.md#cost-and-deadlines). None for an adaptive solver, whose evaluations are known only after."""
        nfe = nfe_for(self.solver, self.steps)
        if nfe is None:
            return None
        return self.latent_shape[0] * self.latent_shape[1] * nfe * (2 if self.guidance != 1.0 else 1)

    def group_key(self, caption_length: int | None) -> tuple:
        """Requests with equal keys share a solve. ``caption_length`` is None for class requests (they have no caption),
        so text and class requests never share one. It is the second entry (what ``generate`` reads back)."""
        return (self.latent_shape, caption_length, self.steps, self.solver, repr(self.schedule),
                self.guidance, self.cfg_channels, repr(self.rope), repr(self.context_drop))


class Sampler:
    """Text encoder + Next-DiT + VAE; ``generate(requests) -> results``. Holds no global state; safe to share between
    threads as long as they don't mutate the modules (every call runs under ``torch.inference_mode``).

    LoRA adapters can be loaded unmerged on the model (``load_adapter``, models/lora.py): each gives a sampler that
    shares every module with this one and solves with that adapter active; solves on the shared model take turns.

    A class-conditional model has no text encoder (passing one is an error: it would be silently unused) and may have
    ``class_names`` (one per class, index order) so that prompts can name classes."""

    def __init__(self, model: NextDiT, text_encoder: TextEncoder | TextEncoderStack | None, vae: ImageVAE | None,
                 config: SamplerConfig | None = None, class_names: list[str] | None = None,
                 vocoder: Vocoder | None = None):
        self.model = model.eval()
        self.config = config or SamplerConfig()
        if self.config.fp8:
            from models.fp8 import quantize_fp8

            quantize_fp8(self.model)
        self.forward = torch.compile(self.model) if self.config.compile else self.model  # what every solve calls
        # the LoRA adapters loaded unmerged on the model, shared with every sampler made from this one, and the one this
        # sampler solves with (None: the model alone)
        self.adapters = lora.LoraAdapters(self.model)
        self.adapter: str | None = None
        self.text_encoder = text_encoder
        self.vae = vae
        audio = model.config.modality == "audio"
        wanted = MEL_VAES if audio else (ImageVAE,)
        if model.config.modality == "points" and vae is not None:
            raise ValueError("a point-cloud model generates coordinates directly: it takes no VAE")
        if vae is not None and not isinstance(vae, wanted):
            raise ValueError(f"an {model.config.modality} model decodes with "
                             f"{' or '.join(c.__name__ for c in wanted)}, got {type(vae).__name__}")
        if vocoder is not None and not audio:
            raise ValueError(f"an {model.config.modality} model takes no vocoder")
        if audio and vae is not None:  # the mel VAE's latents and features must fit the model and the vocoder
            check_audio_latents(model.config, vae.latent_channels, vae.latent_rows, f"the mel VAE {type(vae).__name__}")
            vocoder = vocoder or GriffinLim(vae.mel)
            vocoder.check(vae.mel)
        self.vocoder = vocoder  # audio models: log-mel → waveform (models/vocoder.py)
        if model.config.conditioning == "class":
            if text_encoder is not None:
                raise ValueError("a class-conditional model takes no text encoder (its prompts are class indices or "
                                 "names; the unconditional branch is the null class)")
        elif class_names is not None:
            raise ValueError("class_names given, but the model is text-conditioned")
        elif text_encoder is not None and text_encoder.hidden_size != model.config.cap_feat_dim:
            raise ValueError(f"text encoder width {text_encoder.hidden_size} ≠ the model's cap_feat_dim "
                             f"{model.config.cap_feat_dim}")
        self.class_names = check_class_names(class_names, model.config) if class_names is not None else None
        # case-folded name → index; the first of duplicate names wins (ImageNet has two "crane"s)
        self._class_index: dict[str, int] = {}
        for index, name in enumerate(self.class_names or []):
            self._class_index.setdefault(name.strip().casefold(), index)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str,
                        text_encoder: str | TextEncoderConfig | TextEncoder | TextEncoderStack | None = None,
                        vae: str | VAEConfig | ImageVAE | None = None, config: SamplerConfig | dict | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        ema: bool = False, adapter: str | None = None,
                        vocoder: str | VocoderConfig | Vocoder | None = None, merge_adapter: bool = True) -> Sampler:
        """Load a model folder (ours, official or diffusers). Text encoder / VAE / sampler defaults not given here come
        from the folder's metadata (``text_encoder``, ``vae``, ``sampler`` entries of our config.json).

        ``adapter``: a LoRA adapter folder on this base model (models/lora.py). By default it is merged into the
        model's weights: no compute of its own per step, and a sampler of one adapter has no other variant to share
        the base with. ``merge_adapter=False`` loads it unmerged (``load_adapter``), so that more adapters can share
        the base.

        An audio model's vocoder (docs/sampling.md#audio): ``vocoder`` (a ``SpeechT5HifiGan`` folder, or
        ``"griffin_lim"``), else the metadata's ``vocoder`` entry, else the one published with the mel VAE (an AudioLDM
        pipeline folder's ``vocoder/``), else Griffin-Lim.

        A class-conditional model loads no text encoder (a ``text_encoder`` argument is an error; one recorded in the
        metadata is ignored) and reads its optional ``class_names`` from the metadata."""
        cfg, state, meta = read_checkpoint(model_path, ema=ema)
        model = NextDiT.from_state_dict(cfg, state, device, dtype)
        del state
        if adapter is not None and merge_adapter:  # a LoRA fine-tune of this base model (jobs.export of a lora run)
            model = lora.merge_adapter(model, adapter)
        sampler = cls.from_model(model, meta, model_path, text_encoder, vae, config, device, dtype, vocoder)
        return sampler if adapter is None or merge_adapter else sampler.load_adapter(adapter, adapter)

    @classmethod
    def from_model(cls, model: NextDiT, meta: dict, model_path: str = "",
                   text_encoder: str | TextEncoderConfig | TextEncoder | TextEncoderStack | None = None,
                   vae: str | VAEConfig | ImageVAE | None = None, config: SamplerConfig | dict | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   vocoder: str | VocoderConfig | Vocoder | None = None, vae_required: bool = True) -> Sampler:
        """A sampler around a model already in memory, its text encoder, VAE, vocoder, class names and sampler
        defaults taken as ``from_pretrained`` takes them (arguments first, then the model folder's metadata ``meta``,
        relative paths against ``model_path``). The in-training evaluation builds one this way from the gathered
        weights and the run's references (jobs/training/evaluation.py); a loaded encoder or VAE passed here is used as
        is. ``vae_required=False`` lets an image model go without a VAE when none is given or recorded: its results
        then carry the latent alone (``image`` None)."""
        te_cfg = resolve_text_encoder_config(text_encoder if text_encoder is not None else meta.get("text_encoder"),
                                             model_path)
        loaded = isinstance(vae, (ImageVAE, *MEL_VAES))
        vae_cfg = None if loaded else resolve_vae_config(vae if vae is not None else meta.get("vae"), model_path)
        class_names = None
        if model.config.conditioning == "class":
            if text_encoder is not None:
                raise ValueError(f"{model_path} is a class-conditional model: it takes no text encoder")
            encoder, class_names = None, meta.get("class_names")
        elif isinstance(text_encoder, (TextEncoder, TextEncoderStack)):
            encoder = text_encoder
        elif te_cfg is not None and te_cfg.path:
            encoder = TextEncoder.from_config(te_cfg, device=device, dtype=dtype)
        else:
            raise ValueError(f"no text encoder given and none recorded in {model_path}'s metadata")
        audio = model.config.modality == "audio"
        bundled = None  # the vocoder published with the mel VAE (an AudioLDM pipeline folder's vocoder/)
        if model.config.modality == "points":  # coordinates directly: nothing to decode
            if vae is not None:
                raise ValueError(f"{model_path} is a point-cloud model: it takes no VAE")
            autoencoder = None
        elif loaded:
            autoencoder = vae
        elif vae_cfg is not None and vae_cfg.path and audio:
            # the mel VAE (ours or a diffusers one): its folder holds its scale and mel settings
            autoencoder = load_audio_vae(vae_cfg.path, device)
            bundled = find_audio_vae(vae_cfg.path).vocoder
        elif vae_cfg is not None and vae_cfg.path:
            # Decoding runs in fp32 (docs/official-formats.md#vae-scaling-factors).
            autoencoder = ImageVAE.from_pretrained(vae_cfg.path, vae_cfg.scaling_factor, vae_cfg.shift_factor, device)
        elif not audio and not vae_required:
            autoencoder = None
        else:
            raise ValueError(f"no VAE given and none recorded in {model_path}'s metadata")
        if not isinstance(config, SamplerConfig):  # a preset given here beats the folder's defaults
            config = from_dict(SamplerConfig,
                               merge(meta.get("sampler") or {}, expand_preset(SamplerConfig, config or {})))
        if vocoder is not None and not audio:
            raise ValueError(f"{model_path} is an {model.config.modality} model: it takes no vocoder")
        if audio and not isinstance(vocoder, Vocoder):
            spec = resolve_vocoder_config(vocoder if vocoder is not None else meta.get("vocoder"), model_path)
            vocoder = load_vocoder((spec.path if spec else None) or bundled, autoencoder.mel, device)
        return cls(model, encoder, autoencoder, config, class_names, vocoder)

    def load_adapter(self, name: str, folder: str) -> Sampler:
        """Load the peft LoRA adapter folder ``folder`` unmerged on this sampler's model as ``name``; returns a sampler
        that solves with it and shares every module with this one, so the base weights stay one copy. An adapter that
        does not fit the model is a ValueError naming the folder. ``self.adapters.delete(name)`` unloads it."""
        if self.config.fp8:
            raise ValueError(f"cannot load the LoRA adapter {folder!r} unmerged on FP8 projections (models/fp8.py): "
                             "merge it (Sampler.from_pretrained(..., adapter=...)) instead")
        self.adapters.load(name, folder)
        return self.with_adapter(name)

    def with_adapter(self, name: str | None) -> Sampler:
        """A sampler that shares every module with this one and solves with the loaded adapter ``name`` (None: the model
        alone, without any adapter)."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no LoRA adapter named {name!r} is loaded on this sampler's model")
        view = copy.copy(self)  # shallow: the modules, and the adapters on them, are shared
        view.adapter = name
        return view

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def default_size(self) -> tuple[int, int]:
        cfg = self.model.config
        height, width = image_size(cfg.train_grid[1], cfg.train_grid[2], cfg.patch_size)
        return self.config.width or width, self.config.height or height

    def default_duration(self) -> float:
        """Seconds of an audio clip when the request names none: the config's, else the training length."""
        if self.config.duration is not None:
            return self.config.duration
        cfg = self.model.config  # mel frames of the trained latents: tokens × patch × the VAE's downsampling
        frames = cfg.train_grid[2] * cfg.patch_size * self.vae.config.downsample
        return samples_for(frames, self.vae.mel) / self.vae.mel.sample_rate

    def _shape(self, i: int, req: GenerationRequest) -> tuple[int | None, int | None, tuple[int, int],
                                                              ClipShape | None]:
        """(width, height, latent (h, w), clip) of request ``i``: a size for image models, a duration for audio, a
        point count (latent (1, N)) for point clouds."""
        cfg = self.config
        modality = self.model.config.modality
        if req.points is not None and modality != "points":
            raise ValueError(f"request {i}: an {modality} model takes no point count")
        if modality == "points":
            if req.width is not None or req.height is not None or req.duration is not None:
                raise ValueError(f"request {i}: a point-cloud model takes a point count, not a size or duration")
            count = req.points if req.points is not None else (cfg.points or self.model.config.rope_sides[2])
            check_points(count, cfg.max_points)
            return None, None, (1, count), None
        if modality == "audio":
            if req.width is not None or req.height is not None:
                raise ValueError(f"request {i}: an audio model takes a duration in seconds, not a width or height")
            if self.vae is None:
                raise ValueError("an audio model needs its mel VAE (the latent ↔ seconds relation is the VAE's)")
            seconds = self.default_duration() if req.duration is None else req.duration
            check_duration(seconds, cfg.max_duration)
            clip = clip_shape(self.vae, float(seconds))
            return None, None, clip.latent, clip
        if req.duration is not None:
            raise ValueError(f"request {i}: an image model takes a width and height, not a duration")
        default_w, default_h = self.default_size()
        width = default_w if req.width is None else req.width
        height = default_h if req.height is None else req.height
        check_size(width, height, cfg.max_side, self.model.config.patch_size, cfg.max_pixels)
        return width, height, latent_size(height, width), None

    # ------------------------------------------------------------------------------------------------------------
    def resolve(self, requests: list[GenerationRequest]) -> list[ResolvedRequest]:
        """Validate every request and fill in the defaults; raises ValueError before any work starts."""
        if not requests:
            raise ValueError("no prompts: give at least one generation request")
        cfg = self.config
        plans = []
        for i, req in enumerate(requests):
            if not isinstance(req.prompt, str):
                raise ValueError(f"request {i}: the prompt must be a string, got {type(req.prompt).__name__}")
            self._check_structured(i, req.structured_prompt)
            width, height, latent_shape, clip = self._shape(i, req)
            steps = cfg.steps if req.steps is None else req.steps
            if steps < 1:
                raise ValueError(f"request {i}: steps must be ≥ 1, got {steps}")
            solver = check_solver(req.solver or cfg.solver)
            if req.schedule is None:
                schedule = cfg.schedule
            elif isinstance(req.schedule, ScheduleConfig):
                schedule = req.schedule
            else:  # a name: keep the config's parameters for it
                schedule = dataclasses.replace(cfg.schedule, name=req.schedule)
            guidance = cfg.guidance if req.guidance is None else float(req.guidance)
            if guidance < 0:
                raise ValueError(f"request {i}: guidance must be ≥ 0, got {guidance}")
            channels = req.cfg_channels if req.cfg_channels is not None else cfg.cfg_channels
            if channels is not None and not 1 <= channels <= self.model.config.in_channels:
                raise ValueError(f"request {i}: cfg_channels {channels} outside 1..{self.model.config.in_channels}")
            if req.context_drop is None:
                drop = (ContextDrop(cfg.context_drop_min_tokens, cfg.context_drop_kernel)
                        if cfg.context_drop_min_tokens is not None else None)
            elif req.context_drop is True:
                drop = ContextDrop(0, cfg.context_drop_kernel)
            elif req.context_drop is False:
                drop = None
            else:
                drop = req.context_drop
            seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
            negative = cfg.negative_prompt if req.negative_prompt is None else req.negative_prompt
            label = self._class_label(i, req)
            if label is not None:
                if req.negative_prompt:
                    raise ValueError(f"request {i}: a class-conditional model takes no negative prompt (its "
                                     "unconditional branch is the null class)")
                negative = ""
            plans.append(ResolvedRequest(i, req.prompt, negative, width, height, latent_shape, clip, int(seed), steps,
                                         solver, schedule,
                                         guidance, channels, req.rope_scaling or cfg.rope, drop, label,
                                         req.structured_prompt))
        return plans

    def _check_structured(self, i: int, structured) -> None:
        """A structured prompt is text, for a text encoder that reads one (a stack with a structured-caption part)."""
        if structured is None:
            return
        if not isinstance(structured, str):
            raise ValueError(f"request {i}: structured_prompt must be a string, got {type(structured).__name__}")
        fields = getattr(self.text_encoder, "fields", ())
        if "structured_caption" not in fields:
            raise ValueError(f"request {i}: structured_prompt given, but this model's text encoder reads only the "
                             "prompt (a structured prompt is for a text-encoder stack with a structured_caption part)")

    def _class_label(self, i: int, req: GenerationRequest) -> int | None:
        """The class of request ``i`` (None for a text model): ``class_label``, else the prompt as an index, else the
        prompt as one of the metadata's class names."""
        num_classes = self.model.config.num_classes
        if self.model.config.conditioning != "class":
            if req.class_label is not None:
                raise ValueError(f"request {i}: class_label {req.class_label!r} given, but the model is text-conditioned")
            return None
        if req.class_label is not None:
            try:
                label = operator.index(req.class_label)
            except TypeError:
                raise ValueError(f"request {i}: class_label must be an integer, got "
                                 f"{type(req.class_label).__name__}") from None
        elif re.fullmatch(r"-?[0-9]+", req.prompt.strip()):
            label = int(req.prompt)
        elif req.prompt.strip().casefold() in self._class_index:
            label = self._class_index[req.prompt.strip().casefold()]
        else:
            names = (f"one of its {len(self.class_names)} class names" if self.class_names
                     else "a class name (the model folder records no class_names)")
            raise ValueError(f"request {i}: prompt {req.prompt!r} is neither a class index in [0, {num_classes}) nor "
                             f"{names}; the model has {num_classes} classes")
        if not 0 <= label < num_classes:
            raise ValueError(f"request {i}: class label {label} is outside [0, {num_classes}) (the model has "
                             f"{num_classes} classes; {num_classes} is the null class, used only for CFG)")
        return label

    def _encode(self, texts: list[tuple[str, str]], cache: dict) -> None:
        """Encode each new (prompt, structured prompt) on its own (batch of one): its features never depend on the
        other prompts' lengths."""
        for text in texts:
            if text not in cache:
                feats, mask = self.text_encoder.encode([text[0]], [text[1]])
                cache[text] = (feats[0].float(), mask[0])

    def _captions(self, texts: list[tuple[str, str]], cache: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached features and masks of ``texts`` right-padded to ``length`` tokens: (B, length, D), (B, length)."""
        padded = [pad_captions(cache[t][0][None], cache[t][1][None], length) for t in texts]
        return torch.cat([feats for feats, _ in padded]), torch.cat([mask for _, mask in padded])

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest], progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[GenerationResult]:
        """Generate one image per request (results in request order). ``progress(n)`` is called after each solve with
        the number of requests it finished. ``should_stop()`` is asked before every model evaluation; when it says
        True the call raises :class:`GenerationCancelled` (a server's deadline: docs/sampling.md#cost-and-deadlines)."""
        plans = self.resolve(requests)
        cache: dict = {}
        text = self.model.config.conditioning == "text"
        if text:
            if self.text_encoder is None:
                raise ValueError("this sampler has no text encoder")
            self._encode([t for p in plans for t in (p.text, p.negative_text)], cache)
        groups: dict[tuple, list[ResolvedRequest]] = {}
        for plan in plans:
            length = None  # class requests: no caption
            if text:
                length = max(cache[plan.text][0].shape[0],
                             cache[plan.negative_text][0].shape[0] if plan.guidance != 1.0 else 0)
            groups.setdefault(plan.group_key(length), []).append(plan)

        results: list[GenerationResult | None] = [None] * len(plans)
        with self.adapters.active(self.adapter):  # this sampler's adapter for every solve; other samplers' wait
            for key, members in groups.items():
                slots = 1 if members[0].solver in ADAPTIVE_SOLVERS else self.config.batch_size
                for start in range(0, len(members), slots):
                    chunk = members[start:start + slots]
                    for plan, result in zip(chunk, self._solve(chunk, slots, key[1], cache, should_stop)):
                        results[plan.index] = result
                    if progress is not None:
                        progress(len(chunk))
        return results  # type: ignore[return-value]

    def _conditioning(self, padded: list[ResolvedRequest], caption_length: int | None, cache: dict) -> dict:
        """The ``velocity_fn`` conditioning keywords of one solve's slots (captions or class labels, on the device)."""
        device = self.device
        guided = padded[0].guidance != 1.0  # g = 1 is the conditional velocity alone: no unconditional branch to run
        if padded[0].class_label is not None:
            labels = torch.tensor([p.class_label for p in padded], dtype=torch.long, device=device)
            null = torch.full_like(labels, self.model.config.num_classes)
            return {"labels": labels, "uncond_labels": null if guided else None}
        # The group's own caption length plus CAPTION_PAD masked positions: the same length and the same (masked)
        # attention path whatever the other slots' prompts are.
        length = caption_length + CAPTION_PAD
        feats, mask = self._captions([p.text for p in padded], cache, length)
        uncond_feats = uncond_mask = None
        if guided:
            negatives = [p.negative_text for p in padded]
            uncond_feats, uncond_mask = (a.to(device) for a in self._captions(negatives, cache, length))
        return {"cap_feats": feats.to(device), "cap_mask": mask.to(device), "uncond_feats": uncond_feats,
                "uncond_mask": uncond_mask}

    def _solve(self, chunk: list[ResolvedRequest], slots: int, caption_length: int | None, cache: dict,
               should_stop: Callable[[], bool] | None = None) -> list[GenerationResult]:
        began = time.perf_counter()
        first = chunk[0]
        cfg_model = self.model.config
        device = self.device
        shape = (cfg_model.in_channels, *first.latent_shape)
        padded = list(chunk)
        if self.config.pad_batches and len(chunk) < slots:  # dummy slots: same shapes whatever the batch holds
            padded += [chunk[-1]] * (slots - len(chunk))
        # Each sample's noise from its own generator on the CPU, then moved: identical on every device and batch.
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(p.seed), dtype=torch.float32)
                 for p in padded]
        x0 = torch.stack(noise).to(device)
        fn = velocity_fn(
            self.forward, **self._conditioning(padded, caption_length, cache), guidance=first.guidance,
            cfg_channels=first.cfg_channels, rope_scaling=first.rope, context_drop=first.context_drop,
        )
        if should_stop is not None:
            fn = stoppable(fn, should_stop)
        grid = make_schedule(first.schedule).grid(first.steps)
        solved = solve(fn, x0, grid, first.solver, self.config.atol, self.config.rtol)
        latents = solved.x[: len(chunk)].float()
        images = [None] * len(chunk)
        clips = [(None, None)] * len(chunk)
        clouds = [None] * len(chunk)
        if cfg_model.modality == "points":  # (3, 1, N) → (N, 3)
            clouds = [latents[i][:, 0].T.contiguous().cpu().numpy() for i in range(len(chunk))]
        elif self.vae is not None and first.clip is not None:  # audio: VAE → log-mel → vocoder, one clip at a time
            clips = [decode_audio(self.vae, latents[i].cpu(), first.clip, self.vocoder) for i in range(len(chunk))]
        elif self.vae is not None:  # one at a time: a conv's result must not depend on the batch either
            images = [images_to_uint8(self.vae.decode(latents[i: i + 1]))[0] for i in range(len(chunk))]
        seconds = time.perf_counter() - began
        schedule = make_schedule(first.schedule)
        out = []
        for i, plan in enumerate(chunk):
            meta = {
                "prompt": plan.prompt, "negative_prompt": plan.negative_prompt, "seed": plan.seed,
                "width": plan.width, "height": plan.height, "steps": plan.steps, "steps_meaning": STEPS_MEANING,
                "solver": plan.solver, "schedule": {"name": schedule.name, **schedule.params()},
                "guidance": plan.guidance,
                "cfg_channels": "all" if plan.cfg_channels is None else plan.cfg_channels,
                "rope_scaling": to_dict(plan.rope),
                "context_drop": None if plan.context_drop is None else dataclasses.asdict(plan.context_drop),
                "nfe": solved.nfe, "seconds": round(seconds, 4), "batch": len(chunk), "slots": x0.shape[0],
            }
            if clouds[i] is not None:  # a cloud has a point count, not a size
                del meta["width"], meta["height"]
                meta.update(points=int(clouds[i].shape[0]))
            if plan.clip is not None:  # an audio clip has a duration, not a size
                del meta["width"], meta["height"]
                meta.update(duration=plan.clip.seconds, sample_rate=self.vae.mel.sample_rate,
                            vocoder=self.vocoder.name)
            if plan.structured_prompt is not None:
                meta["structured_prompt"] = plan.structured_prompt
            if self.config.fp8:
                meta["fp8"] = True
            if plan.class_label is not None:  # the null class is the unconditional branch: no negative prompt
                meta.update(negative_prompt=None, class_label=plan.class_label,
                            class_name=self.class_names[plan.class_label] if self.class_names else None)
            waveform, mel = clips[i]
            out.append(GenerationResult(images[i], latents[i].cpu(), meta, waveform,
                                        None if waveform is None else self.vae.mel.sample_rate, mel, clouds[i]))
        return out


# ---------------------------------------------------------------------------------------------------------------------
def check_class_names(names, config) -> list[str]:
    """The ``class_names`` metadata of a class-conditional model: one string per class, in index order."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be a list of strings, got {type(names).__name__}")
    if len(names) != config.num_classes:
        raise ValueError(f"class_names has {len(names)} entries but the model has {config.num_classes} classes")
    return names


def _resolve_path(path: str | None, base: str) -> str | None:
    """A relative path recorded in a model folder's metadata is relative to that folder (when it exists there)."""
    if not path or os.path.isabs(path) or "://" in path:
        return path
    candidate = os.path.join(base, path)
    return candidate if os.path.exists(candidate) else path


def _component_config(spec, config_cls, instance_cls, model_path: str):
    """A component reference (a path, a dict of its config, or its config) as ``config_cls`` with the path resolved
    against the model folder; None for nothing or an already loaded ``instance_cls``."""
    if spec is None or isinstance(spec, instance_cls):
        return None
    if isinstance(spec, str):
        spec = config_cls(path=spec)
    elif isinstance(spec, dict):
        spec = from_dict(config_cls, spec)
    return dataclasses.replace(spec, path=_resolve_path(spec.path, str(model_path)))


def stoppable(fn: Callable, should_stop: Callable[[], bool]) -> Callable:
    """``fn`` (a velocity function) that first asks ``should_stop()`` and raises GenerationCancelled when it says so."""
    def checked(*args, **kwargs):
        if should_stop():
            raise GenerationCancelled("the solve was stopped between two model evaluations (its deadline passed)")
        return fn(*args, **kwargs)

    return checked


def resolve_text_encoder_config(spec, model_path: str) -> TextEncoderConfig | None:
    return _component_config(spec, TextEncoderConfig, (TextEncoder, TextEncoderStack), model_path)


def resolve_vae_config(spec, model_path: str) -> VAEConfig | None:
    return _component_config(spec, VAEConfig, ImageVAE, model_path)


def resolve_vocoder_config(spec, model_path: str) -> VocoderConfig | None:
    return _component_config(spec, VocoderConfig, Vocoder, model_path)
