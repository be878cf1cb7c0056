"""The two audio networks the published FAD and KL numbers were made with, read from their released weights files,
in pure PyTorch (docs/evaluation.md#vggish-and-panns):

    VGGish  (Hershey et al. 2017, "CNN architectures for large-scale audio classification"): the network of the FAD
            paper (Kilgour et al. 2019) and of the FAD columns of AudioLDM and Make-An-Audio. torchvggish's port of
            Google's weights, ``vggish-10086976.pth``. One 128-d embedding per 0.96-s example of a clip.
    CNN14   (Kong et al. 2020, "PANNs: Large-scale pretrained audio neural networks"): audioldm_eval's classifier for
            KL and its "FD" embedding. ``Cnn14_mAP=0.431.pth`` (32 kHz), ``Cnn14_16k_mAP=0.438.pth`` (16 kHz),
            ``Cnn14_8k_mAP=0.416.pth`` (8 kHz). One 2048-d embedding and 527 AudioSet logits per clip.

``load_audio_embeddings(path)`` / ``load_audio_classifier(path)`` are what jobs.evaluate loads FAD's and KL's network
with: a weights file is one of these two, a folder a transformers model (``models.audio_metrics``).
``load_audio_network(path, output)`` reads a ``.pth`` file, tells the two layouts apart by their keys and builds the
network at the widths the file holds, so the released files give the released networks (and the tests' narrow random
files the same code paths). Both take float waveforms at any rate (resampled to the network's) and are deterministic.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.audio_metrics import resample
from models.image_features import fingerprint

# VGGish's front end (torchvggish's vggish_params.py, the values of Google's release)
VGGISH_RATE = 16_000
VGGISH_WINDOW, VGGISH_HOP, VGGISH_FFT = 400, 160, 512  # 25 ms and 10 ms at 16 kHz; the next power of two
VGGISH_MELS, VGGISH_MEL_RANGE_HZ = 64, (125.0, 7500.0)
VGGISH_LOG_OFFSET = 0.01
VGGISH_EXAMPLE_FRAMES = 96  # one example: 0.96 s of 10-ms frames
VGGISH_LAYERS = ("conv", "pool", "conv", "pool", "conv", "conv", "pool", "conv", "conv", "pool")  # 64 M 128 M …
VGGISH_EXAMPLE_SECONDS = VGGISH_EXAMPLE_FRAMES * VGGISH_HOP / VGGISH_RATE

# CNN14's front ends: the FFT size, stored in the file as the STFT's convolution, says which release it is
CNN14_RELEASES = {1024: (32_000, 320), 512: (16_000, 160), 256: (8_000, 80)}  # n_fft → (sample rate, hop)
CNN14_BLOCKS = 6
CNN14_AMIN = 1e-10  # torchlibrosa's power_to_db floor (ref 1.0, no top_db)


def read_state(local: str, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a released weights file (``local``, a local copy of ``path``): a plain state dict, or one under
    ``model`` / ``state_dict`` (PANNs saves ``{"model": …}``), ``module.`` prefixes dropped. Read with
    ``weights_only``: tensors, never pickled code."""
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no audio network weights file at {path}") from None
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds pickled objects besides its tensors, which are not loaded (weights_only). If "
                         "you trust the file, keep its weights only: torch.save(torch.load(path, weights_only=False)"
                         "['model'], 'cnn14.pth')") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


class AudioNetwork(nn.Module):
    """Waveforms → vectors; ``id`` names the network in reports and statistics caches, ``sample_rate`` is its own."""

    id: str = ""
    sample_rate: int = 0
    vector_unit = "clip"  # what one FAD vector stands for

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ------------------------------------------------------------------------------------------------------------ VGGish


def vggish_mel_matrix() -> torch.Tensor:
    """(257, 64) triangular weights on the HTK mel scale, mel = 1127 ln(1 + f / 700), evenly spaced in mel between
    125 and 7500 Hz, unnormalised, the DC bin zeroed (Google's mel_features.spectrogram_to_mel_matrix)."""
    def mel(hz):
        return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)

    bins = mel(torch.linspace(0.0, VGGISH_RATE / 2, VGGISH_FFT // 2 + 1, dtype=torch.float64))
    edges = torch.linspace(float(mel(VGGISH_MEL_RANGE_HZ[0])), float(mel(VGGISH_MEL_RANGE_HZ[1])), VGGISH_MELS + 2,
                           dtype=torch.float64)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0] = 0.0
    return weights


def vggish_examples(wave: torch.Tensor, mel_matrix: torch.Tensor) -> torch.Tensor:
    """A 16-kHz clip (samples,) → its log-mel examples (E, 96, 64): magnitude STFT of 25-ms periodic-Hann frames every
    10 ms (FFT 512, whole frames only), 64 mel bands, ln(mel + 0.01), cut into non-overlapping 0.96-s examples (Google's
    vggish_input.waveform_to_examples; a partial last example is dropped, as there)."""
    wave = wave.to(torch.float64)
    frames = wave.unfold(0, VGGISH_WINDOW, VGGISH_HOP)  # (T, 400)
    window = torch.hann_window(VGGISH_WINDOW, periodic=True, dtype=torch.float64, device=wave.device)
    magnitude = torch.fft.rfft(frames * window, n=VGGISH_FFT).abs()  # (T, 257)
    log_mel = torch.log(magnitude @ mel_matrix + VGGISH_LOG_OFFSET)  # (T, 64)
    return log_mel.unfold(0, VGGISH_EXAMPLE_FRAMES, VGGISH_EXAMPLE_FRAMES).transpose(1, 2).float()


class VGGish(AudioNetwork):
    """VGGish at the widths of ``state`` (torchvggish's layout: ``features.{0,3,6,8,11,13}`` 3×3 convolutions with
    ReLU, 2×2 max-pools after the 1st, 2nd, 4th and 6th; ``embeddings.{0,2,4}`` fully connected). The embedding is the
    last layer's output before torchvggish's final ReLU, as Google's TensorFlow model gives it (its ``fc2`` has no
    activation) and the FAD tools use it; no PCA or 8-bit quantisation (the FAD paper's embeddings are the raw ones).

    ``forward(waves, rate)`` → (E, 128): every 0.96-s example of every clip, the FAD paper's unit. A clip shorter than
    one example is padded with silence to one."""

    sample_rate = VGGISH_RATE
    vector_unit = f"{VGGISH_EXAMPLE_SECONDS:g}-s example"  # one FAD vector each

    def __init__(self, state: dict[str, torch.Tensor], name: str = "vggish"):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for kind in VGGISH_LAYERS:  # in torchvggish's order, so the convolutions sit at features.{0,3,6,8,11,13}
            if kind == "pool":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            width = _shape(state, f"features.{len(layers)}.weight", 4)[0]
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        grid = (VGGISH_EXAMPLE_FRAMES // 16) * (VGGISH_MELS // 16)  # four 2×2 pools of the 96 × 64 example
        hidden = [_shape(state, f"embeddings.{i}.weight", 2) for i in (0, 2, 4)]
        if hidden[0][1] != channels * grid:
            raise ValueError(f"{name}: embeddings.0 takes {hidden[0][1]} inputs, but the convolutions give "
                             f"{channels} × {grid}: not VGGish's layout")
        self.embeddings = nn.Sequential(nn.Linear(hidden[0][1], hidden[0][0]), nn.ReLU(),
                                        nn.Linear(hidden[1][1], hidden[1][0]), nn.ReLU(),
                                        nn.Linear(hidden[2][1], hidden[2][0]))
        _load(self, state, name)
        self.register_buffer("mel_matrix", vggish_mel_matrix(), persistent=False)
        self.dim = hidden[2][0]

    def embed_examples(self, examples: torch.Tensor) -> torch.Tensor:
        """(E, 96, 64) log-mel examples → (E, 128) embeddings."""
        x = self.features(examples[:, None].to(self.device))  # (E, C, 6, 4)
        # flattened in TensorFlow's (height, width, channel) order, the order the released fc weights expect
        return self.embeddings(x.permute(0, 2, 3, 1).flatten(1))

    @torch.no_grad()
    def forward(self, waves: Sequence[Any], rate: int) -> torch.Tensor:
        shortest = VGGISH_EXAMPLE_FRAMES * VGGISH_HOP + VGGISH_WINDOW - VGGISH_HOP  # 0.975 s: one whole example
        examples = []
        for wave in waves:
            x = torch.from_numpy(resample(wave, rate, self.sample_rate))
            examples.append(vggish_examples(F.pad(x, (0, max(0, shortest - len(x)))), self.mel_matrix.cpu()))
        return self.embed_examples(torch.cat(examples)).float()


# ------------------------------------------------------------------------------------------------------------- CNN14


class _ConvBlock(nn.Module):
    """PANNs' ConvBlock: two 3×3 convolutions without bias, each with batch norm and ReLU, then average pooling."""

    def __init__(self, channels: int, width: int, pool: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, self.pool)


class Cnn14(AudioNetwork):
    """PANNs' CNN14 at the widths and front end of ``state`` (audioset_tagging_cnn's layout):

        power spectrogram  |STFT|² with the file's own DFT × Hann convolution (``spectrogram_extractor.stft``),
                           centred, reflect-padded by n_fft / 2 (torchlibrosa)
        log-mel            10 log10(max(power @ melW, 1e-10)), ``logmel_extractor.melW`` (Slaney mel, 50 Hz – fmax)
        bn0                batch norm over the mel bins
        6 conv blocks      2×2 average pools after the first five
        pooling            mean over frequency, then max + mean over time
        embedding          ReLU(fc1(x)), 2048-d (audioldm_eval's "2048" features, its FD)
        logits             fc_audioset(embedding), 527 AudioSet classes (sigmoid: multi-label; KL's input)

    The sample rate follows the FFT size (``CNN14_RELEASES``). ``output`` picks what ``forward`` returns: "embedding"
    (FAD) or "logits" (KL). Clips shorter than 32 frames (one time step after the pools) are padded with silence."""

    multi_label = True  # AudioSet: a sigmoid per class, so KL's "auto" mode is sigmoid

    def __init__(self, state: dict[str, torch.Tensor], output: str = "embedding", name: str = "cnn14"):
        super().__init__()
        if output not in ("embedding", "logits"):
            raise ValueError(f"CNN14 gives an embedding or logits, not {output!r}")
        self.output = output
        stft = _shape(state, "spectrogram_extractor.stft.conv_real.weight", 3)  # (n_fft / 2 + 1, 1, n_fft)
        n_fft = stft[2]
        if n_fft not in CNN14_RELEASES:
            raise ValueError(f"{name}: an STFT of {n_fft} points; the CNN14 releases use "
                             f"{sorted(CNN14_RELEASES)} (8, 16 and 32 kHz)")
        self.sample_rate, self.hop = CNN14_RELEASES[n_fft]
        self.n_fft = n_fft
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = nn.Module()
        self.spectrogram_extractor.stft.conv_real = nn.Conv1d(1, stft[0], n_fft, stride=self.hop, bias=False)
        self.spectrogram_extractor.stft.conv_imag = nn.Conv1d(1, stft[0], n_fft, stride=self.hop, bias=False)
        self.logmel_extractor = nn.Module()
        self.logmel_extractor.melW = nn.Parameter(torch.empty(_shape(state, "logmel_extractor.melW", 2)))
        mels = self.logmel_extractor.melW.shape[1]
        self.bn0 = nn.BatchNorm2d(mels)
        channels = 1
        for i in range(1, CNN14_BLOCKS + 1):
            width = _shape(state, f"conv_block{i}.conv1.weight", 4)[0]
            setattr(self, f"conv_block{i}", _ConvBlock(channels, width, 2 if i < CNN14_BLOCKS else 1))
            channels = width
        fc1, head = _shape(state, "fc1.weight", 2), _shape(state, "fc_audioset.weight", 2)
        self.fc1 = nn.Linear(fc1[1], fc1[0])
        self.fc_audioset = nn.Linear(head[1], head[0])
        _load(self, state, name)
        self.dim = fc1[0] if output == "embedding" else head[0]
        self.min_frames = 2 ** (CNN14_BLOCKS - 1)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, samples) → (B, 1, frames, mels)."""
        x = F.pad(x[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        stft = self.spectrogram_extractor.stft
        power = stft.conv_real(x) ** 2 + stft.conv_imag(x) ** 2  # (B, n_fft / 2 + 1, frames)
        mel = power.transpose(1, 2) @ self.logmel_extractor.melW
        return 10.0 * torch.log10(torch.clamp(mel, min=CNN14_AMIN))[:, None]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples) at the network's rate → (embedding (B, 2048), logits (B, 527))."""
        x = self.bn0(self.log_mel(x).transpose(1, 3)).transpose(1, 3)  # batch norm per mel bin
        for i in range(1, CNN14_BLOCKS + 1):
            x = getattr(self, f"conv_block{i}")(x)
        x = x.mean(3)  # over frequency → (B, C, time)
        x = x.amax(2) + x.mean(2)
        embedding = F.relu(self.fc1(x))
        return embedding, self.fc_audioset(embedding)

    @torch.no_grad()
    def forward(self, waves: Sequence[Any], rate: int) -> torch.Tensor:
        shortest = (self.min_frames - 1) * self.hop
        clips = [torch.from_numpy(resample(w, rate, self.sample_rate)) for w in waves]
        clips = [F.pad(c, (0, max(0, shortest - len(c)))) for c in clips]
        out: list[torch.Tensor | None] = [None] * len(clips)
        for length in sorted({len(c) for c in clips}):  # clips of one length in one batch: no padding inside a batch
            index = [i for i, c in enumerate(clips) if len(c) == length]
            embedding, logits = self.heads(torch.stack([clips[i] for i in index]).to(self.device))
            for i, row in zip(index, embedding if self.output == "embedding" else logits):
                out[i] = row
        return torch.stack(out).float()


# ----------------------------------------------------------------------------------------------------------- loading


def _shape(state: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state or state[key].ndim != ndim:
        raise ValueError(f"the weights have no {ndim}-d {key!r}")
    return tuple(state[key].shape)


def _load(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys, or mismatched shapes
        raise ValueError(f"{name} does not fit {type(module).__name__}'s layout: {exc}") from exc
    module.eval().requires_grad_(False)


def network_layout(state: dict[str, torch.Tensor]) -> str | None:
    """"vggish", "cnn14", or None, from the keys of a state dict."""
    if "features.0.weight" in state and "embeddings.0.weight" in state:
        return "vggish"
    if "conv_block1.conv1.weight" in state and "fc_audioset.weight" in state:
        return "cnn14"
    return None


def load_audio_network(path: str, output: str = "embedding") -> AudioNetwork:
    """The network in the weights file ``path`` (local or s3://): VGGish (``output`` "embedding" only: it has no
    classifier) or CNN14 (its embedding, or its AudioSet logits with ``output="logits"``)."""
    from models.storage import local_path

    local = local_path(path)
    state = read_state(local, path)
    layout = network_layout(state)
    if layout == "vggish":
        if output != "embedding":
            raise ValueError(f"{path} is VGGish, which has no classifier: KL needs PANNs' CNN14 or a transformers "
                             "audio classifier")
        network: AudioNetwork = VGGish(state, name=path)
    elif layout == "cnn14":
        network = Cnn14(state, output, name=path)
    else:
        raise ValueError(f"{path}: neither VGGish's layout (torchvggish: features.*, embeddings.*) nor PANNs' CNN14 "
                         "(conv_block1…6, fc1, fc_audioset)")
    network.id = f"{'vggish' if layout == 'vggish' else 'panns-cnn14'}:{fingerprint(local)}"
    return network


def is_weights_file(path: str) -> bool:
    """A released weights file (.pth / .pt / .bin, or any local file) rather than a transformers model folder."""
    import os

    from models.storage import is_remote

    name = str(path).rstrip("/")
    return name.endswith((".pth", ".pt", ".bin")) or (not is_remote(name) and os.path.isfile(name))


def load_audio_embeddings(path: str) -> nn.Module:
    """FAD's network: VGGish or CNN14 from a weights file, else a transformers folder (``AudioEmbeddings``)."""
    from models.audio_metrics import AudioEmbeddings

    return load_audio_network(path, "embedding") if is_weights_file(path) else AudioEmbeddings(path)


def load_audio_classifier(path: str) -> nn.Module:
    """KL's classifier: CNN14 from a weights file (AudioSet, multi-label), else a transformers folder
    (``AudioClassifier``)."""
    from models.audio_metrics import AudioClassifier

    return load_audio_network(path, "logits") if is_weights_file(path) else AudioClassifier(path)
