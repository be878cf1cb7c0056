"""The demo's in-training scorers (jobs.demo_data): the share of samples showing what their prompt names, the report's
fidelity numbers as eval.scorers (docs/training.md#in-training-evaluation)."""

from __future__ import annotations

import numpy as np
import torch

from jobs.demo_data import SAMPLE_RATE, pitch_fidelity, solid_caption, solid_fidelity, solid_points, tone_caption
from jobs.training.evaluation import EvalSample
from models.sampler import GenerationResult


def sample(prompt: str, **result) -> EvalSample:
    return EvalSample(index=0, prompt=prompt, seed=0, class_label=None, path="x",
                      result=GenerationResult(image=None, latent=torch.zeros(1), metadata={}, **result))


def test_pitch_fidelity_is_the_share_of_clips_at_the_pitch_their_prompt_names():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    clips = [sample(tone_caption(440), audio=tone, sample_rate=SAMPLE_RATE),
             sample(tone_caption(880), audio=tone, sample_rate=SAMPLE_RATE),
             sample("a dog barking", audio=tone, sample_rate=SAMPLE_RATE),  # names no pitch: not counted
             sample(tone_caption(440))]  # no clip: not counted
    assert pitch_fidelity(clips) == {"pitch_fidelity": 0.5}
    assert pitch_fidelity(clips[2:]) == {}


def test_solid_fidelity_is_the_share_of_clouds_nearest_the_solid_their_prompt_names():
    from pipelines.decode import normalise_unit_sphere

    # placed as jobs.prepare places every training cloud, so as the model generates them
    cube = normalise_unit_sphere(solid_points("cube", 256, np.random.default_rng(0))).astype(np.float32)
    clouds = [sample(solid_caption("cube"), points=cube), sample(solid_caption("sphere"), points=cube),
              sample(solid_caption("cube"), points=cube), sample("a teapot", points=cube)]
    assert solid_fidelity(clouds) == {"solid_fidelity": 2 / 3}
    assert solid_fidelity(clouds[3:]) == {}
