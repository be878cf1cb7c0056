"""Point-cloud generation metrics (paper §5.3, Table 7): MMD and COV under the Chamfer distance, and 1-NNA.

With G the generated clouds and R the reference clouds, all batched torch on any device:

    CD(X, Y)  = mean_x min_y ‖x − y‖² + mean_y min_x ‖x − y‖²          (squared distances, as PointFlow reports)
    MMD-CD    = mean over r ∈ R of min over g ∈ G of CD(g, r)             (lower is better: fidelity)
    COV-CD    = |{argmin_r CD(g, r) : g ∈ G}| / |R|                       (higher is better: R's modes that G reaches)
    1-NNA-CD  = accuracy of the leave-one-out 1-nearest-neighbour classifier telling G from R in G ∪ R
                (50 % is ideal: the sets are indistinguishable; 100 %: fully separable)

Clouds of one set share their point count (a batch of (B, N, 3)); the two sets may differ (a model sampled at 2048 points
against a 2048-point reference, or any pair of densities).
"""

from __future__ import annotations

import torch


def chamfer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N, 3), (B, M, 3) → (B,) Chamfer distances of the pairs x[b], y[b] (squared Euclidean)."""
    # the direct difference, not the ‖x‖² + ‖y‖² − 2xy expansion: a cloud against itself is exactly 0, so ties of
    # 1-NNA and MMD's zero are exact
    d = torch.cdist(x.float(), y.float(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # (B, N, M)
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def chamfer_matrix(a: torch.Tensor, b: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(A, N, 3), (B, M, 3) → (A, B): the Chamfer distance of every pair, ``batch`` pairs at a time."""
    out = torch.empty(a.shape[0], b.shape[0], device=a.device)
    for i in range(a.shape[0]):
        for j in range(0, b.shape[0], batch):
            rows = b[j: j + batch]
            out[i, j: j + rows.shape[0]] = chamfer(a[i: i + 1].expand(rows.shape[0], -1, -1), rows)
    return out


def mmd_cov(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """MMD-CD and COV-CD of ``generated`` (G, N, 3) against ``reference`` (R, M, 3)."""
    d = chamfer_matrix(generated, reference)  # (G, R)
    return {"mmd_cd": float(d.min(0).values.mean()),
            "cov_cd": float(d.argmin(1).unique().numel() / reference.shape[0])}


def one_nna(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy of telling ``generated`` from ``reference`` (Chamfer distance), in [0, 1]."""
    n_g = generated.shape[0]
    d_gg, d_rr = chamfer_matrix(generated, generated), chamfer_matrix(reference, reference)
    d_gr = chamfer_matrix(generated, reference)
    top = torch.cat([d_gg, d_gr], dim=1)  # rows: the generated clouds; columns: G then R
    bottom = torch.cat([d_gr.T, d_rr], dim=1)
    d = torch.cat([top, bottom], dim=0)
    d.fill_diagonal_(float("inf"))  # leave one out
    labels = torch.cat([torch.zeros(n_g, dtype=torch.bool), torch.ones(reference.shape[0], dtype=torch.bool)])
    predicted = labels.to(d.device)[d.argmin(1)]
    return float((predicted == labels.to(d.device)).float().mean())


def point_metrics(generated: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``{"mmd_cd", "cov_cd", "1nna_cd"}`` of generated against reference clouds."""
    return {**mmd_cov(generated, reference), "1nna_cd": one_nna(generated, reference)}
