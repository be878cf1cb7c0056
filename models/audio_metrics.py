"""Audio generation metrics: FAD, KL and the CLAP score, with the networks behind them loaded from local folders.

    FAD        = FD(embeddings of the real clips, of the generated clips)                (Kilgour et al. 2019,
                 "Fréchet Audio Distance"; ``models.image_metrics.frechet_distance`` on ``AudioEmbeddings``)
    KL         = mean over pairs i of Σ_c p_c(realᵢ) (log p_c(realᵢ) − log p_c(fakeᵢ))   (AudioGen, AudioLDM:
                 KL(real ‖ generated) of a classifier's predictions, each generated clip paired with the real clip of
                 its prompt; ``softmax`` over the logits, or ``sigmoid``: audioldm_eval's "KL_Sigmoid", the same sum
                 over the multi-label sigmoid outputs)
    CLAP score = 100 · max(cos(E_audio, E_text), 0) per pair, averaged (the CLIP score with CLAP's towers,
                 ``models.image_metrics.clip_score``)

Models (nothing downloads: local folders, or ``s3://`` fetched once into the local cache; the released weights
files of VGGish and PANNs' CNN14 are ``models.audio_networks``, whose ``load_audio_embeddings`` /
``load_audio_classifier`` pick between them and these):
- ``AudioEmbeddings(folder)``: a transformers ``ClapModel`` folder (the projected audio embedding, FAD as fadtk's
  ``clap-laion-*``), or any transformers audio encoder with a feature extractor (wav2vec 2.0, HuBERT, AST, …: the
  time-average of its last hidden state);
- ``AudioClassifier(folder)``: a transformers audio classifier (``AutoModelForAudioClassification``: AST fine-tuned on
  AudioSet, …) for KL;
- ``ClapScorer(folder)``: a ``ClapModel`` folder for the CLAP score.

Clips are float waveforms at any rate, mono; each model's feature extractor says its rate, and clips are resampled to
it here (``torchaudio.functional.resample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.image_features import fingerprint, pooled_output
from models.image_metrics import clip_score


def resample(wave: Any, rate: int, target: int) -> np.ndarray:
    """A mono float32 waveform at ``target`` Hz."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.ndim == 2:  # (samples, channels) from soundfile, or (channels, samples)
        x = x.mean(1) if x.shape[0] > x.shape[1] else x.mean(0)
    if rate != target:
        import torchaudio.functional as AF

        x = AF.resample(x, rate, target)
    return x.numpy()


def kl_divergence(real_logits: Any, fake_logits: Any, mode: str = "softmax") -> float:
    """Mean KL(real ‖ fake) of paired classifier logits (N, K): ``softmax`` (a distribution over classes) or ``sigmoid``
    (audioldm_eval's multi-label variant). Row i of both is one prompt."""
    real = torch.as_tensor(np.asarray(real_logits), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_logits), dtype=torch.float64)
    if real.shape != fake.shape:
        raise ValueError(f"KL needs paired predictions: {tuple(real.shape)} real vs {tuple(fake.shape)} generated")
    if mode == "softmax":
        log_p, log_q = real.log_softmax(1), fake.log_softmax(1)
    elif mode == "sigmoid":
        log_p, log_q = torch.nn.functional.logsigmoid(real), torch.nn.functional.logsigmoid(fake)
    else:
        raise ValueError(f"KL mode must be softmax or sigmoid, got {mode!r}")
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


class _FolderModel(torch.nn.Module):
    """A transformers model folder with a feature extractor (``preprocessor_config.json``), on one device."""

    def __init__(self, folder: str, loader: Any = None):
        super().__init__()
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        from models.storage import local_path

        path = local_path(folder)
        self.config = AutoConfig.from_pretrained(path)
        self.model = (loader or AutoModel).from_pretrained(path).eval().requires_grad_(False)
        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: no audio feature extractor (preprocessor_config.json) beside the model; "
                             "save the model's feature extractor into the folder") from exc
        self.sample_rate = int(self.extractor.sampling_rate)
        self.id = f"{self.config.model_type}:{fingerprint(path)}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, waves: Sequence[Any], rate: int) -> dict[str, torch.Tensor]:
        """The feature extractor's tensors for clips at ``rate`` Hz, on the model's device. CLAP's extractor crops long
        clips at random and flags a random clip as long when none is: clips are cut to its length first and the flags
        set from the real lengths, so the same clips always give the same embeddings."""
        clips = [resample(w, rate, self.sample_rate) for w in waves]
        kwargs: dict[str, Any] = {"sampling_rate": self.sample_rate, "return_tensors": "pt"}
        if self.config.model_type == "clap":
            limit = int(self.extractor.nb_max_samples)
            clips = [c[:limit] for c in clips]
            fusion = bool(getattr(self.config.audio_config, "enable_fusion", False))
            kwargs["truncation"] = "fusion" if fusion else "rand_trunc"
        else:
            kwargs["padding"] = True
        features = self.extractor(clips, **kwargs)
        if "is_longer" in features:
            features["is_longer"] = torch.zeros_like(features["is_longer"], dtype=torch.bool)
        return {k: v.to(self.device) for k, v in features.items() if isinstance(v, torch.Tensor)}


class AudioEmbeddings(_FolderModel):
    """Clips → embeddings (B, D) for FAD: a ``ClapModel``'s projected audio embedding, else the time-average of an audio
    encoder's last hidden state (masked by its attention mask when it gives one)."""

    @torch.no_grad()
    def forward(self, waves: Sequence[Any], rate: int) -> torch.Tensor:
        inputs = self.inputs(waves, rate)
        if hasattr(self.model, "get_audio_features"):
            return pooled_output(self.model.get_audio_features(**inputs)).float()
        hidden = self.model(**inputs).last_hidden_state  # (B, T, D)
        return hidden.float().mean(1)


class AudioClassifier(_FolderModel):
    """Clips → classifier logits (B, K) for KL, from an ``AutoModelForAudioClassification`` folder; ``multi_label``
    when the model was trained multi-label (AudioSet), which makes ``sigmoid`` its natural KL mode."""

    def __init__(self, folder: str):
        from transformers import AutoModelForAudioClassification

        super().__init__(folder, AutoModelForAudioClassification)
        self.multi_label = getattr(self.config, "problem_type", None) == "multi_label_classification"

    @torch.no_grad()
    def forward(self, waves: Sequence[Any], rate: int) -> torch.Tensor:
        return self.model(**self.inputs(waves, rate)).logits.float()


class ClapScorer(_FolderModel):
    """The CLAP score of clip–prompt pairs with a transformers ``ClapModel`` folder (model, tokenizer, feature
    extractor)."""

    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        super().__init__(folder)
        if not (hasattr(self.model, "get_audio_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"{folder} is a {type(self.model).__name__}; the CLAP score needs a ClapModel folder")
        from models.storage import local_path

        self.tokenizer = AutoTokenizer.from_pretrained(local_path(folder))

    @torch.no_grad()
    def embed(self, waves: Sequence[Any], rate: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        audio = pooled_output(self.model.get_audio_features(**self.inputs(waves, rate)))
        limit = int(getattr(self.config.text_config, "max_position_embeddings", 512)) - 2  # RoBERTa's offset
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit,
                                return_tensors="pt").to(self.device)
        text = pooled_output(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"]))
        return audio.float(), text.float()

    def forward(self, waves: Sequence[Any], rate: int, prompts: list[str]) -> torch.Tensor:
        """(B,) CLAP scores of waves[i] with prompts[i]."""
        if len(prompts) != len(waves):
            raise ValueError(f"{len(waves)} clips but {len(prompts)} prompts")
        return clip_score(*self.embed(waves, rate, prompts))
