"""Generation metrics on features (images, and audio through ``models.audio_metrics``): the Fréchet distance (FID,
sFID, FD_DINOv2, FAD), KID, the Inception Score, precision and recall, the CLIP score, and the reference statistics
they compare against.

Every metric here takes features, not images: the networks that make them are ``models.image_features`` (and
``models.audio_metrics``), so one function serves every extractor. With X the real features (N, D), Y the generated
ones (M, D), all in float64:

    FD(X, Y)   = ‖μ_X − μ_Y‖² + Tr Σ_X + Tr Σ_Y − 2 Tr (Σ_X^½ Σ_Y Σ_X^½)^½       (Heusel et al. 2017, "GANs trained
                 by a two time-scale update rule", eq. 6; Σ unbiased, N − 1, as numpy.cov and the ADM suite)
    KID(X, Y)  = MMD²_u with k(x, y) = (xᵀy / D + 1)³, averaged over random subsets    (Bińkowski et al. 2018,
                 "Demystifying MMD GANs", §4; subsets as torch-fidelity and torchmetrics draw them)
    IS         = exp E_x KL(p(y|x) ‖ p(y)), per split, mean and std                     (Salimans et al. 2016, §4)
    CLIP score = 100 · max(cos(E_image, E_text), 0) per pair, averaged                 (Hessel et al. 2021, CLIPScore,
                 with torchmetrics' weight 100 instead of the paper's 2.5, the scale text-to-image papers report)
    precision  = 1/M Σ_j 1[∃i: ‖y_j − x_i‖ ≤ r_k(x_i)],  recall = 1/N Σ_i 1[∃j: ‖x_i − y_j‖ ≤ r_k(y_j)]
                 with r_k(x_i) the distance from x_i to its k-th nearest neighbour in its own set, k = 3
                 (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative models")

Reference statistics (μ, Σ, N and, for KID, the features themselves) are ``FeatureStats``: written and read as
``.npz`` (``save_stats`` / ``load_stats``), which also reads the ADM evaluation suite's reference batches (Dhariwal &
Nichol 2021, openai/guided-diffusion ``evaluations/``: ``mu`` / ``sigma`` of Inception pool features, ``mu_s`` /
``sigma_s`` of its spatial features, and the images themselves as ``arr_0``, N×H×W×3 uint8), so the published ImageNet
references work as they are (docs/evaluation.md#reference-statistics).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STATS_FORMAT = "lumina-ray/feature-stats"  # the `format` entry of the .npz files written here


# ---------------------------------------------------------------------------------------------------- Fréchet distance


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, from its eigendecomposition (rounding's
    tiny negative eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy arrays or tensors), in float64.

    The trace term Tr (Σ₁Σ₂)^½ is computed as Tr (Σ₁^½ Σ₂ Σ₁^½)^½: the product Σ₁Σ₂ is similar to the symmetric
    positive semi-definite Σ₁^½ Σ₂ Σ₁^½, so both have the same eigenvalues, and the symmetric form needs only
    ``eigh`` (stable, real by construction, on any device). ``scipy.linalg.sqrtm`` of the non-symmetric product, which
    pytorch-fid and the ADM suite use, returns rounding-level imaginary parts, and fails on the singular products of
    fewer samples than dimensions (their fallback adds 1e-6 to both diagonals); the two agree to about 1e-6 relative
    (tests/test_evaluate.py). A negative result is rounding and is returned as 0.
    """
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics of different features: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, sigma "
                         f"{tuple(sigma1.shape)} vs {tuple(sigma2.shape)} (same extractor and layer on both sides?)")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


# ------------------------------------------------------------------------------------------------ feature statistics


@dataclass
class FeatureStats:
    """μ (D,) and Σ (D, D) of ``n`` feature vectors; ``features`` (n, D) float32 when kept (KID needs them);
    ``meta``: what made them (extractor, resolution, the source's listing hash, the file it came from)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def frechet_distance(self, other: FeatureStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


class StatsAccumulator:
    """Running mean and covariance of feature batches in float64, merged batch by batch with the pairwise update of
    Chan, Golub & LeVeque (1979): with δ = μ_b − μ_a and n = n_a + n_b,

        μ = μ_a + δ n_b / n,    M₂ = M₂_a + M₂_b + δδᵀ n_a n_b / n,    Σ = M₂ / (n − 1)

    (M₂ the sum of outer products of deviations), which unlike Σxxᵀ − nμμᵀ loses no precision to large means.
    ``keep_features`` also keeps every vector (float32), for KID.
    """

    def __init__(self, keep_features: bool = True):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.keep_features = keep_features
        self.kept: list[np.ndarray] = []

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64).reshape(len(features), -1)
        if x.shape[0] == 0:
            return
        if self.keep_features:
            self.kept.append(x.float().numpy())
        n_b, mean_b = x.shape[0], x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"features of width {mean_b.numel()} after {self.mean.numel()}: one extractor per set")
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def stats(self, meta: dict[str, Any] | None = None) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 feature vectors, got {self.n}")
        features = np.concatenate(self.kept) if self.keep_features else None
        return FeatureStats(self.mean.numpy(), (self.m2 / (self.n - 1)).numpy(), self.n, features, dict(meta or {}))


def feature_stats(features: torch.Tensor | np.ndarray, meta: dict[str, Any] | None = None) -> FeatureStats:
    """``FeatureStats`` of one (N, D) array of features."""
    acc = StatsAccumulator()
    acc.update(features)
    return acc.stats(meta)


# -------------------------------------------------------------------------------------------------------- KID, IS, CLIP


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased MMD² of two equal-size samples (m, D) under the cubic polynomial kernel:
    [Σ_{i≠j} k(xᵢ, xⱼ) + Σ_{i≠j} k(yᵢ, yⱼ)] / (m(m − 1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / m²."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.mean()


def kernel_inception_distance(real: Any, fake: Any, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) of real (N, D) and generated (M, D) features over ``subsets`` random subsets of
    min(``subset_size``, N, M) vectors from each set (each subset drawn without replacement, from a generator seeded
    with ``seed``: the same sets give the same numbers)."""
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID of features of different widths: {x.shape[1]} and {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {x.shape[0]} real and {y.shape[0]} fake")
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack([mmd2_unbiased(x[torch.randperm(x.shape[0], generator=gen)[:m]],
                                        y[torch.randperm(y.shape[0], generator=gen)[:m]]) for _ in range(subsets)])
    return float(values.mean()), (float(values.std(unbiased=False)) if subsets > 1 else 0.0)


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """IS (mean, std over ``splits`` consecutive splits) from classifier logits (N, K): per split,
    exp(mean_x Σ_y p(y|x) (log p(y|x) − log p̂(y))) with p̂ the split's mean prediction."""
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    if log_p.shape[0] < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} samples, got {log_p.shape[0]}")
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances as ‖a‖² − 2ab + ‖b‖² (one matrix product; clamped at 0, which
    rounding can cross for near-identical vectors)."""
    return (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None, :]).clamp(min=0)


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """(N,) squared distance from each vector to its k-th nearest neighbour in the same set, itself left out: the
    (k + 1)-th smallest of its row, the first being its own 0. Rows ``chunk`` at a time (see ``precision_recall``)."""
    if features.shape[0] <= k:
        raise ValueError(f"the {k}-nearest-neighbour radius needs more than {k} vectors, got {features.shape[0]}")
    return torch.cat([_squared_distances(part, features).topk(k + 1, dim=1, largest=False).values[:, -1]
                      for part in torch.split(features, chunk)])


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """(len(points),) whether each point lies in at least one ball (centre, radius), ``chunk`` points at a time."""
    return torch.cat([(_squared_distances(part, centres) <= radii[None, :]).any(1) for part in torch.split(points, chunk)])


def precision_recall(real: Any, fake: Any, k: int = 3, chunk: int = 1024,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features ``fake`` (M, D) against real
    ``real`` (N, D), in float64 on ``device``. Each set's manifold is the union of balls around its vectors, each ball
    reaching that vector's k-th nearest neighbour in its own set (k = 3, the paper's choice and the ADM suite's):
    precision is the fraction of generated vectors inside the real manifold (sample quality), recall the fraction of
    real vectors inside the generated one (coverage).

    Distances are computed ``chunk`` rows at a time against the whole other set, so at most chunk × max(N, M) of them
    exist at once (1024 × 50 000 × 8 bytes = 410 MB for the 50K protocol, beside the 2 × 50 000 × 2048 × 8 bytes = 1.6 GB
    of the two sets), never the 50K × 50K matrix. No randomness, and the same chunks in the same order: the same sets
    give the same numbers. Squared distances are compared with squared radii, which orders them the same way."""
    x = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"precision / recall of features of different shapes: {tuple(x.shape)} and {tuple(y.shape)}")
    precision = _inside_manifold(y, x, knn_radii(x, k, chunk), chunk).double().mean()
    recall = _inside_manifold(x, y, knn_radii(y, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair (B,): 100 · max(cos(image_embeds[i], text_embeds[i]), 0)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cos.clamp(min=0)


# ------------------------------------------------------------------------------------------------ statistics files


def listing_hash(entries: list[tuple[str, int]]) -> str:
    """A short hash of a source's listing: its (relative name, size in bytes) pairs, in sorted order. A cached
    statistic is reused only for the same listing; rewriting a file in place with the same size is the one change it
    does not see (a full content hash would read the whole set, which is what the cache saves)."""
    digest = hashlib.sha256()
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def stats_key(extractor: str, resolution: int | None, listing: str) -> str:
    """The cache file name of a reference's statistics: extractor id, resolution and listing hash."""
    raw = json.dumps({"extractor": extractor, "resolution": resolution, "listing": listing}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24] + ".npz"


def save_stats(path: str, stats: FeatureStats, spatial: FeatureStats | None = None) -> None:
    """Write ``stats`` as ``.npz``: ``mu``, ``sigma`` (the ADM key names, so ADM's own tools read the pool statistics
    too), ``n``, ``features`` when kept, ``meta`` (JSON text with ``format``), and with ``spatial`` the sFID
    statistics as ADM's ``mu_s`` / ``sigma_s``."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.asarray(stats.n),
              "meta": np.asarray(json.dumps({"format": STATS_FORMAT, **stats.meta}, sort_keys=True))}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = spatial.mu, spatial.sigma
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name without it
        np.savez(f, **arrays)


@dataclass
class ReferenceFile:
    """What a statistics ``.npz`` holds: ``pool`` statistics (ours, or ADM's ``mu`` / ``sigma``), ADM's ``spatial``
    ones (``mu_s`` / ``sigma_s``, the sFID features), and whether it carries an image batch (``arr_0``) to extract
    features from. ADM files record no sample count; ``pool.n`` is then 0."""

    pool: FeatureStats | None
    spatial: FeatureStats | None
    images: int  # images in arr_0 (0: none)
    image_shape: tuple[int, ...] | None
    adm: bool


def load_stats(path: str) -> ReferenceFile:
    """Read a statistics ``.npz``: one written by ``save_stats``, or an ADM reference batch
    (docs/evaluation.md#the-adm-reference-format). A file with neither ``mu``/``sigma`` nor ``arr_0`` is an error naming its keys."""
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        meta = json.loads(str(data["meta"])) if "meta" in keys else {}
        ours = meta.get("format") == STATS_FORMAT
        pool = spatial = None
        if "mu" in keys and "sigma" in keys:
            n = int(data["n"]) if "n" in keys else 0
            features = data["features"] if "features" in keys else None
            info = {k: v for k, v in meta.items() if k != "format"} if ours else {"source": "adm", "file": str(path)}
            pool = FeatureStats(data["mu"], data["sigma"], n, features, info)
        if "mu_s" in keys and "sigma_s" in keys:
            spatial = FeatureStats(data["mu_s"], data["sigma_s"], pool.n if ours and pool else 0, None,
                                   {k: v for k, v in meta.items() if k != "format"} if ours
                                   else {"source": "adm", "file": str(path)})
    images, shape = _npz_array_shape(path, "arr_0")
    if pool is None and not images:
        raise ValueError(f"{path}: no statistics (mu, sigma) and no image batch (arr_0) in it; keys: "
                         f"{', '.join(sorted(keys)) or 'none'}")
    return ReferenceFile(pool, spatial, images, shape, adm=not ours)


def _npz_array_shape(path: str, key: str) -> tuple[int, tuple[int, ...] | None]:
    with zipfile.ZipFile(path) as archive:
        if f"{key}.npy" not in archive.namelist():
            return 0, None
        with archive.open(f"{key}.npy") as f:
            shape, _, _ = _read_npy_header(f)
    return (shape[0] if shape else 0), shape


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0 and 3.0 share the header layout (3.0: UTF-8 field names)


def iter_npz_images(path: str, batch_size: int = 64, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Batches (B, H, W, 3) uint8 of the image array ``key`` of an ``.npz`` (ADM's sample and reference batches),
    streamed from the archive so a 10,000-image reference never sits in memory whole."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{path}: {key} is {dtype} {shape}{' (Fortran order)' if fortran else ''}; an image batch "
                             "is N×H×W×3 uint8 in C order")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(per_image * count)
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
