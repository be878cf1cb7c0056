"""Tiny random models built locally (never downloaded): the demo's text encoder, the serve benchmark's CPU smoke models
and the tests' (tests/tiny_models.py imports them from here; this module owns the vocabulary).

A decoder-only LLM (Gemma architecture, 2 layers) with a word-level tokenizer that adds <bos> like Gemma's, or a T5
encoder whose tokenizer appends </s>. Random weights still give every word its own features, which is all a model
trained on those features needs to tell "red" from "blue". Also a tiny /8 VAE, a tiny Next-DiT model folder in our
format that references them, and peft LoRA adapter folders with random weights for any Next-DiT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from models import NextDiT, NextDiTConfig

BASE_WORDS = (
    "a an the of on in with and is at by to from under over near "
    "red blue green yellow black white grey gray orange purple big small tiny large old new bright dark "
    "cat dog bird fish horse house tree car boat flower mountain river sky city road forest beach "
    "photo painting drawing sketch render portrait landscape cinematic sunset night morning "
    "circle square triangle background tone pitched low middle high sphere cube cylinder"
).split()
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TINY_TEXT_DIM = 32  # = preset("tiny").cap_feat_dim: the default width of the tiny text encoders


def vocabulary(extra_text: Iterable[str] = ()) -> list[str]:
    """Base words plus every lower-case word of ``extra_text`` (e.g. a data set's captions), de-duplicated, in order."""
    words = list(BASE_WORDS)
    seen = set(words)
    for text in extra_text:
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words


def word_level_tokenizer(words: list[str], style: str = "gemma"):
    """A PreTrainedTokenizerFast over ``words``: ``gemma`` puts <bos> first ("" → [<bos>]), ``t5`` appends <eos>,
    ``clap`` does both.

    Saved with left padding on purpose (Gemma's default): the TextEncoder must force right padding itself.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "gemma":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A $B <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    elif style == "clap":  # RoBERTa's <s> … </s>
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A $B <eos>",
            special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; choose gemma, t5 or clap")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    return tokenizer, vocab


def make_tiny_text_encoder(path, hidden_size: int = TINY_TEXT_DIM, seed: int = 0,
                           words: list[str] | None = None) -> str:
    """A tiny random GemmaModel + tokenizer saved in ``path``; returns the path."""
    from transformers import GemmaConfig, GemmaModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "gemma")
    config = GemmaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2, max_position_embeddings=512,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(seed)
    GemmaModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    return str(path)


def make_tiny_t5(path, d_model: int = TINY_TEXT_DIM, seed: int = 0, words: list[str] | None = None) -> str:
    """A tiny random T5EncoderModel + tokenizer saved in ``path``; returns the path."""
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "t5")
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    return str(path)


def make_tiny_clap(path, projection_dim: int = TINY_TEXT_DIM, seed: int = 0, words: list[str] | None = None) -> str:
    """A tiny random ClapTextModelWithProjection (CLAP's text branch) + tokenizer saved in ``path``; returns the path."""
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "clap")
    config = ClapTextConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=48, projection_dim=projection_dim, max_position_embeddings=128,
                            pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
    torch.manual_seed(seed)
    ClapTextModelWithProjection(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    return str(path)


def make_tiny_text_encoder_stack(path, width: int = TINY_TEXT_DIM, seed: int = 0,
                                 words: list[str] | None = None) -> str:
    """The audio model's dual encoder in tiny (paper §5.2): a stack folder with a CLAP text branch on the caption and a
    T5 encoder on the structured caption, both ``width`` wide, as subfolders; returns the path."""
    from models.text_encoder import StackPart, write_stack

    make_tiny_clap(Path(path) / "clap", width, seed, words)
    make_tiny_t5(Path(path) / "t5", width, seed + 1, words)
    return write_stack(str(path), [StackPart("clap", field="caption"), StackPart("t5", field="structured_caption")])


def make_tiny_vae(path, seed: int = 0, scaling_factor: float = 0.13025) -> str:
    """A tiny random AutoencoderKL (/8, 4 latent channels) in ``path``; returns the path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=scaling_factor,
    )
    vae.eval().save_pretrained(path)
    return str(path)


def make_tiny_audio_vae(path, seed: int = 0) -> str:
    """A tiny random mel VAE (models.audio_vae's "tiny" preset: 80 mels → 20 latent channels) saved as a folder."""
    from models.audio_vae import AudioVAE, AudioVAEConfig
    from models.config_io import from_dict

    torch.manual_seed(seed)
    AudioVAE(from_dict(AudioVAEConfig, {"preset": "tiny"})).eval().save_pretrained(path)
    return str(path)


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-zero random values (the zero-init gates would hide most of the network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + std * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen) * (4 if "gate" in name else 1))
    return module


def random_nextdit(cfg: NextDiTConfig, seed: int = 0) -> NextDiT:
    """A NextDiT of ``cfg`` in eval mode with every weight random and non-zero (see ``randomise``)."""
    from models import NextDiT

    torch.manual_seed(seed)
    return randomise(NextDiT(cfg).eval(), seed)


def make_tiny_model_folder(path, text_encoder: str | None = None, vae: str | None = None, model=None,
                           sampler: dict | None = None, seed: int = 0, preset_name: str = "tiny",
                           class_names: list[str] | None = None) -> str:
    """A tiny Next-DiT (random non-zero weights of ``preset_name``, e.g. "tiny-class", unless ``model`` is given) saved
    in our format, with metadata ``text_encoder`` / ``vae`` (paths), optional ``sampler`` defaults and optional
    ``class_names`` (class-conditional models); returns the path."""
    from models import preset

    if model is None:
        model = random_nextdit(preset(preset_name), seed=seed)
    metadata = {}
    if class_names is not None:
        metadata["class_names"] = list(class_names)
    if text_encoder is not None:
        metadata["text_encoder"] = {"path": str(text_encoder)}  # kind and layer: the folder's (a stack too)
    if vae is not None:
        metadata["vae"] = {"path": str(vae), "scaling_factor": 0.13025, "shift_factor": 0.0}
    if sampler is not None:
        metadata["sampler"] = sampler
    model.save_pretrained(str(path), fmt="ours", metadata=metadata)
    return str(path)


def make_lora_adapter(model: torch.nn.Module, path, seed: int = 0, target_modules: Iterable[str] = ("wq", "w2"),
                      rank: int = 4, alpha: float | None = None, std: float = 0.5) -> str:
    """A peft LoRA adapter folder for ``model`` (what a LoRA run's export writes) with random non-zero weights: B is
    zero at initialisation, and an adapter that changes nothing would test nothing. ``alpha`` defaults to the rank.
    ``model`` gets its own layers back, frozen (peft freezes the base it wraps); returns the path."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules))
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(str(path))
    peft_model.unload()
    return str(path)


def make_tiny_vocoder(path, mel=None, seed: int = 0) -> str:
    """A tiny random HiFi-GAN (transformers ``SpeechT5HifiGan``, the layout AudioLDM publishes under vocoder/) for the
    features ``mel`` (default ``MelConfig()``): ``model_in_dim`` = n_mels, ``sampling_rate`` = the sample rate, and
    upsample rates (at most 3 stages, 16 → 2 channels) whose product is the hop; returns the path."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from models.mel import MelConfig

    mel = mel or MelConfig()
    rates, n, p = [], mel.hop_length, 2
    while n > 1:  # the hop's prime factors, then the two smallest merged until three are left
        while n % p == 0:
            rates.append(p)
            n //= p
        p += 1
    while len(rates) > 3:
        rates = sorted([rates[0] * rates[1], *rates[2:]])
    rates = sorted(rates, reverse=True)
    config = SpeechT5HifiGanConfig(
        model_in_dim=mel.n_mels, sampling_rate=mel.sample_rate, upsample_initial_channel=16, upsample_rates=rates,
        upsample_kernel_sizes=[2 * r if r % 2 == 0 else r for r in rates], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], normalize_before=False)
    torch.manual_seed(seed)
    SpeechT5HifiGan(config).eval().save_pretrained(Path(path))
    return str(path)


def make_tiny_audioldm(path, seed: int = 0, scaling_factor: float = 0.9227914214134216, vocoder: bool = True) -> str:
    """A tiny random folder in AudioLDM's pipeline layout (docs/official-formats.md#audioldm-layout): ``vae/`` a
    diffusers AutoencoderKL on 1-channel mel images (8 latent channels, 3 blocks: /4 in time and frequency),
    ``vocoder/`` a tiny ``SpeechT5HifiGan`` for AudioLDM's features (``models.audioldm.AUDIOLDM_MEL``) unless
    ``vocoder`` is False, and a ``model_index.json``; returns the path."""
    import json

    from diffusers import AutoencoderKL

    from models.audioldm import AUDIOLDM_MEL

    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(8, 8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=64, scaling_factor=scaling_factor,
    ).eval().save_pretrained(Path(path) / "vae")
    index = {"_class_name": "AudioLDMPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    if vocoder:
        make_tiny_vocoder(Path(path) / "vocoder", AUDIOLDM_MEL, seed)
        index["vocoder"] = ["transformers", "SpeechT5HifiGan"]
    (Path(path) / "model_index.json").write_text(json.dumps(index, indent=2))
    return str(path)


def make_tiny_clip(path, image_size: int = 32, projection_dim: int = 16, seed: int = 0,
                   words: list[str] | None = None) -> str:
    """A tiny random transformers CLIPModel (image and text towers) with a word-level tokenizer (<bos> … <eos>, CLIP's
    text tower pools at <eos>) and a ``preprocessor_config.json``, saved in ``path``: the CLIP score's and FD_CLIP's
    model in the tests; returns the path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "clap")
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": vocab["<pad>"],
                     "bos_token_id": vocab["<bos>"], "eos_token_id": vocab["<eos>"]},
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(Path(path))
    return str(path)


def make_tiny_dinov2(path, image_size: int = 32, seed: int = 0) -> str:
    """A tiny random transformers Dinov2Model saved in ``path`` (no preprocessor file: the config's image size and
    ImageNet's mean and std apply): FD_DINOv2's model in the tests; returns the path."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                          image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(Path(path))
    return str(path)


def make_tiny_clap_model(path, sample_rate: int = 16000, seconds: int = 1, projection_dim: int = 16, seed: int = 0,
                         words: list[str] | None = None) -> str:
    """A tiny random transformers ClapModel (text and HTS-AT audio towers, no fusion) with a word-level tokenizer and a
    ClapFeatureExtractor (16 mel bands at ``sample_rate``, clips of ``seconds``, whole seconds: the extractor pads by it), saved in ``path``: FAD's and the
    CLAP score's model in the tests; returns the path."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "clap")
    config = ClapConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 48, "max_position_embeddings": 64, "pad_token_id": vocab["<pad>"],
                     "bos_token_id": vocab["<bos>"], "eos_token_id": vocab["<eos>"]},
        # HTS-AT in miniature: a 64² spectrogram image from 16 mel bands, two Swin stages
        audio_config={"spec_size": 64, "num_mel_bins": 16, "patch_size": 4, "patch_stride": [4, 4], "window_size": 4,
                      "depths": [1, 1], "num_attention_heads": [2, 2], "hidden_size": 32,
                      "patch_embeds_hidden_size": 16, "enable_fusion": False},
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    ClapModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    ClapFeatureExtractor(feature_size=16, sampling_rate=sample_rate, hop_length=sample_rate // 100,
                         max_length_s=seconds, fft_window_size=sample_rate // 40, frequency_min=0,
                         frequency_max=sample_rate // 2, truncation="rand_trunc").save_pretrained(Path(path))
    return str(path)


def make_tiny_audio_classifier(path, labels: int = 8, sample_rate: int = 16000, seed: int = 0) -> str:
    """A tiny random transformers Audio Spectrogram Transformer classifier (``labels`` classes, multi-label as the
    AudioSet ones) with its feature extractor (16 mel bands, 64 frames), saved in ``path``: KL's model in the tests;
    returns the path."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    config = ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                       frequency_stride=8, time_stride=8, max_length=64, num_mel_bins=16, num_labels=labels,
                       problem_type="multi_label_classification")
    torch.manual_seed(seed)
    ASTForAudioClassification(config).eval().save_pretrained(Path(path))
    ASTFeatureExtractor(feature_size=1, sampling_rate=sample_rate, num_mel_bins=16, max_length=64,
                        do_normalize=True).save_pretrained(Path(path))
    return str(path)


def make_tiny_vggish(path, widths: tuple[int, ...] = (4, 8, 8, 8, 16, 16), hidden: int = 32, dim: int = 8,
                     seed: int = 0) -> str:
    """A narrow random VGGish in torchvggish's weights layout (``features.{0,3,6,8,11,13}``, ``embeddings.{0,2,4}``;
    the release is 64…512 wide with 4096-wide layers and a 128-d embedding), saved as one ``.pth`` file: FAD's network
    in the tests. ``path`` is the file; returns it."""
    g = torch.Generator().manual_seed(seed)
    state, channels = {}, 1
    for index, width in zip((0, 3, 6, 8, 11, 13), widths):
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
        state[f"features.{index}.bias"] = 0.1 * torch.randn(width, generator=g)
        channels = width
    for index, (inputs, outputs) in zip((0, 2, 4), ((channels * 24, hidden), (hidden, hidden), (hidden, dim))):
        state[f"embeddings.{index}.weight"] = torch.randn(outputs, inputs, generator=g) / inputs ** 0.5
        state[f"embeddings.{index}.bias"] = 0.1 * torch.randn(outputs, generator=g)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return str(path)


def make_tiny_cnn14(path, sample_rate: int = 16000, widths: tuple[int, ...] = (4, 4, 8, 8, 16, 16), classes: int = 10,
                    seed: int = 0) -> str:
    """A narrow random PANNs CNN14 in audioset_tagging_cnn's layout, saved as its checkpoints are (``{"model": …}``):
    the release's front end for ``sample_rate`` (the STFT as torchlibrosa's DFT × periodic-Hann convolution, the
    Slaney mel bank, 64 bands from 50 Hz), six conv blocks of ``widths`` (the release: 64…2048), ``classes`` outputs
    (the release: 527). KL's and FAD's CNN14 in the tests; ``path`` is the file; returns it."""
    import math

    import torchaudio.functional as AF

    n_fft = {32000: 1024, 16000: 512, 8000: 256}[sample_rate]
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    state = {"spectrogram_extractor.stft.conv_real.weight": (torch.cos(2 * math.pi * k * n / n_fft) * window)[:, None],
             "spectrogram_extractor.stft.conv_imag.weight": (-torch.sin(2 * math.pi * k * n / n_fft) * window)[:, None],
             "logmel_extractor.melW": AF.melscale_fbanks(n_fft // 2 + 1, 50.0, min(14000.0, sample_rate / 2), 64,
                                                         sample_rate, norm="slaney", mel_scale="slaney")}
    state = {key: value.float() for key, value in state.items()}

    def batch_norm(prefix: str, width: int) -> None:
        state.update({f"{prefix}.weight": 1 + 0.1 * torch.randn(width, generator=g),
                      f"{prefix}.bias": 0.1 * torch.randn(width, generator=g),
                      f"{prefix}.running_mean": torch.randn(width, generator=g),
                      f"{prefix}.running_var": 1 + torch.rand(width, generator=g),
                      f"{prefix}.num_batches_tracked": torch.tensor(100)})

    batch_norm("bn0", 64)
    state["bn0.running_mean"] = -40 + 10 * torch.randn(64, generator=g)  # log-mel levels in dB
    state["bn0.running_var"] = 100 + 50 * torch.rand(64, generator=g)
    channels = 1
    for i, width in enumerate(widths, start=1):
        state[f"conv_block{i}.conv1.weight"] = torch.randn(width, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
        state[f"conv_block{i}.conv2.weight"] = torch.randn(width, width, 3, 3, generator=g) / (3 * width ** 0.5)
        batch_norm(f"conv_block{i}.bn1", width)
        batch_norm(f"conv_block{i}.bn2", width)
        channels = width
    for name, outputs in (("fc1", channels), ("fc_audioset", classes)):
        state[f"{name}.weight"] = torch.randn(outputs, channels, generator=g) / channels ** 0.5
        state[f"{name}.bias"] = 0.1 * torch.randn(outputs, generator=g)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return str(path)
