"""Model-score filters (issue "Stages: filter"): CLIP image–text similarity, an aesthetic head on CLIP image embeddings,
CLAP-style text–audio similarity. Scores are recorded in every sample's json; thresholds reject with a reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.config_io import from_dict
from models.storage import local_path
from pipelines import constants as C
from pipelines.config import PrepareConfig, mel_config
from pipelines.stage import Stage, meta_of, reject_row

R = C.Reason


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP on L2-normalised CLIP image embeddings (its state-dict layout:
    layers.0/2/4/6/7 linear, dropouts between), so its released weights load by path."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def load(cls, path: str) -> "AestheticHead":
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint must never run code
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features (projected embeddings in pooler_output)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class ScoreFilter(Stage):
    """CLIP image–text similarity and aesthetic score (images), CLAP text–audio similarity (audio).

    Scores are recorded in the sample's json under ``scores``; a sample below a set threshold is rejected. Samples
    without a caption get no similarity score (and are not rejected for it).
    """

    stage = C.STAGE_SCORE

    def __init__(self, config: dict, modality: str, device: str | None = None, mel: dict | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.cfg = from_dict(PrepareConfig, config).filter
        self.modality = modality
        self.sample_rate = mel_config(mel).sample_rate  # of the decoded audio (encode.run_mel)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = local_path(self.cfg.clip_model if modality == C.IMAGE else self.cfg.clap_model)  # s3:// → local cache
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if modality == C.IMAGE:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(path)
        else:
            from transformers import AutoFeatureExtractor

            self.processor = AutoFeatureExtractor.from_pretrained(path)
        self.aesthetic = None
        if modality == C.IMAGE and self.cfg.aesthetic_model:
            self.aesthetic = AestheticHead.load(local_path(self.cfg.aesthetic_model)).to(self.device)

    @torch.no_grad()
    def embed_media(self, payloads: list[np.ndarray]) -> torch.Tensor:
        if self.modality == C.IMAGE:
            pixels = self.processor(images=list(payloads), return_tensors="pt")["pixel_values"].to(self.device)
            return _features(self.model.get_image_features(pixel_values=pixels))
        import torchaudio.functional as AF

        rate = int(self.processor.sampling_rate)
        waves = [AF.resample(torch.from_numpy(p), self.sample_rate, rate).numpy() if rate != self.sample_rate else p
                 for p in payloads]
        inputs = self.processor(waves, sampling_rate=rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return _features(self.model.get_audio_features(**inputs))

    def max_text_tokens(self) -> int:
        """Tokens a caption may keep: the tokenizer's limit, which knows what the position table cannot hold (RoBERTa-
        style towers like CLAP's start positions after the padding index: 512 tokens of 514 positions), capped by the
        position table for tokenizers saved without a limit (transformers then reports a huge sentinel)."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        positions = int(getattr(text_config, "max_position_embeddings", 77))
        return min(int(self.tokenizer.model_max_length), positions)

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_text_tokens(),
                                return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens))

    def process_rows(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
        if not rows:
            return rows, []
        media = torch.nn.functional.normalize(self.embed_media([r[C.PAYLOAD] for r in rows]).float(), dim=-1)
        scores: list[dict[str, float]] = [{} for _ in rows]
        with_caption = [i for i, r in enumerate(rows) if str(r[C.CAPTION]).strip()]
        if with_caption:
            text = torch.nn.functional.normalize(
                self.embed_text([str(rows[i][C.CAPTION]) for i in with_caption]).float(), dim=-1)
            sims = (media[with_caption] * text).sum(-1).cpu().tolist()
            name = "clip" if self.modality == C.IMAGE else "clap"
            for i, s in zip(with_caption, sims):
                scores[i][name] = round(float(s), 5)
        if self.aesthetic is not None:
            with torch.no_grad():
                for i, s in enumerate(self.aesthetic(media).cpu().tolist()):
                    scores[i]["aesthetic"] = round(float(s), 5)
        kept, rejects = [], []
        for row, score in zip(rows, scores):
            reason = self.judge(score)
            if reason:
                rejects.append(reject_row(row, reason[0], reason[1]))
                continue
            meta_of(row).setdefault("scores", {}).update(score)
            kept.append(row)
        return kept, rejects

    def judge(self, score: dict[str, float]) -> tuple[str, str] | None:
        cfg = self.cfg
        checks = [("clip", cfg.min_clip_score, R.LOW_CLIP_SCORE), ("clap", cfg.min_clap_score, R.LOW_CLAP_SCORE),
                  ("aesthetic", cfg.min_aesthetic, R.LOW_AESTHETIC)]
        for name, threshold, reason in checks:
            if threshold is not None and name in score and score[name] < threshold:
                return reason, f"{name} {score[name]:.4f} < {threshold}"
        return None
