"""Captioning (issue "Stages: caption"): an actor pool running a captioner loaded by path through transformers.

- images: any image-to-text / vision-language model ``AutoModelForImageTextToText`` loads (VisionEncoderDecoder, BLIP,
  LLaVA-style with ``caption.prompt``);
- 3D: the same image model captions a grid of views rendered from the sampled points (a numpy splat renderer: no GL);
- audio: any ``AutoModelForSpeechSeq2Seq`` model (speech/audio encoder–decoder).

Existing captions are kept unless ``caption.recaption``; every sample's json records where its caption came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.config_io import from_dict
from models.points import render_views  # the one renderer of clouds: captions see what generate writes
from models.storage import local_path
from pipelines import constants as C
from pipelines.config import PrepareConfig, mel_config
from pipelines.stage import Stage, meta_of, reject_row


class Captioner(Stage):
    """Captions the rows that need one (all rows with ``recaption``); records ``caption_source``."""

    stage = C.STAGE_CAPTION

    def __init__(self, config: dict, modality: str, device: str | None = None, mel: dict | None = None):
        self.cfg = from_dict(PrepareConfig, config).caption
        self.modality = modality
        self.sample_rate = mel_config(mel).sample_rate  # of the decoded audio (encode.run_mel)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = local_path(self.cfg.audio_model if modality == C.AUDIO else self.cfg.model)  # s3:// → local cache
        self.path = path
        if modality == C.AUDIO:
            from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer

            self.model = AutoModelForSpeechSeq2Seq.from_pretrained(path)
            self.features = AutoFeatureExtractor.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.processor = None
        else:
            from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
            from transformers.processing_utils import ProcessorMixin

            self.model = AutoModelForImageTextToText.from_pretrained(path)
            processor = AutoProcessor.from_pretrained(path)
            # a folder with a full processor (VLMs) uses it; an encoder–decoder folder has image processor + tokenizer
            self.processor = processor if isinstance(processor, ProcessorMixin) else None
            self.features = None if self.processor else AutoImageProcessor.from_pretrained(path)
            self.tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(path)
        self.model.to(self.device).eval()

    def needs_caption(self, row: dict[str, Any]) -> bool:
        return self.cfg.recaption or not str(row[C.CAPTION]).strip()

    def model_input(self, row: dict[str, Any]) -> np.ndarray:
        if self.modality == C.POINTS:
            return render_views(row[C.PAYLOAD], self.cfg.views, self.cfg.view_size)
        return row[C.PAYLOAD]

    @torch.no_grad()
    def generate(self, inputs: list[np.ndarray]) -> list[str]:
        gen = {"max_new_tokens": self.cfg.max_new_tokens}
        if self.modality == C.AUDIO:
            rate = int(self.features.sampling_rate)
            if rate != self.sample_rate:
                import torchaudio.functional as AF

                inputs = [AF.resample(torch.from_numpy(x), self.sample_rate, rate).numpy() for x in inputs]
            batch = self.features(inputs, sampling_rate=rate, return_tensors="pt", padding=True)
            out = self.model.generate(**{k: v.to(self.device) for k, v in batch.items()}, **gen)
            return self.tokenizer.batch_decode(out, skip_special_tokens=True)
        if self.processor is not None:
            kwargs = {"images": list(inputs), "return_tensors": "pt"}
            if self.cfg.prompt:
                kwargs.update(text=[self.cfg.prompt] * len(inputs), padding=True)
            batch = {k: v.to(self.device) for k, v in self.processor(**kwargs).items() if hasattr(v, "to")}
            out = self.model.generate(**batch, **gen)
            if "input_ids" in batch and not self.model.config.is_encoder_decoder:
                out = out[:, batch["input_ids"].shape[1]:]  # decoder-only VLMs echo the prompt
            return self.tokenizer.batch_decode(out, skip_special_tokens=True)
        pixels = self.features(images=list(inputs), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.generate(pixel_values=pixels, **gen)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def process_rows(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
        todo = [i for i, r in enumerate(rows) if self.needs_caption(r)]
        if todo:
            captions = self.generate([self.model_input(rows[i]) for i in todo])
            for i, text in zip(todo, captions):
                row = rows[i]
                meta = meta_of(row)
                if str(row[C.CAPTION]).strip():
                    meta["original_caption"] = str(row[C.CAPTION])  # recaption keeps what it replaced
                meta["caption_model"] = self.path
                row[C.CAPTION] = " ".join(text.split())
                row[C.CAPTION_SOURCE] = C.CAPTION_FROM_MODEL
        if not self.cfg.require_caption:
            return rows, []
        kept = [r for r in rows if str(r[C.CAPTION]).strip()]
        rejects = [reject_row(r, C.Reason.NO_CAPTION, "empty caption") for r in rows if not str(r[C.CAPTION]).strip()]
        return kept, rejects
