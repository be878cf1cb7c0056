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


def chamfer(x: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(B, N, 3), (B, M, 3) → (B,) Chamfer distances of the pairs x[b], y[b] (squared Euclidean). Exact either way:
    ``backend`` "matrix" computes all N × M distances at once (batched torch, on any device), "kdtree" the nearest
    neighbours from KD-trees on the CPU, which at 2048 points is over ten times faster than the matrix there
    (docs/benchmarks.md#point-clouds-at-other-densities-cpu); "auto": the KD-trees for CPU tensors, else the matrix."""
    if backend not in ("auto", "matrix", "kdtree"):
        raise ValueError(f"backend must be auto, matrix or kdtree, got {backend!r}")
    if backend == "kdtree" or (backend == "auto" and x.device.type == "cpu"):
        return _chamfer_kdtree(x, y)
    # the direct difference, not the ‖x‖² + ‖y‖² − 2xy expansion: a cloud against itself is exactly 0, so ties of
    # 1-NNA and MMD's zero are exact
    d = torch.cdist(x.float(), y.float(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # (B, N, M)
    return d.min(2).values.mean(1) + d.min(1).values.mean(1)


def _chamfer_kdtree(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from scipy.spatial import cKDTree

    out = []
    for a, b in zip(x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()):
        to_b = cKDTree(b).query(a)[0]  # each point of a to its nearest in b (exact, float64)
        to_a = cKDTree(a).query(b)[0]
        out.append((to_b ** 2).mean() + (to_a ** 2).mean())
    return torch.tensor(out, dtype=torch.float32, device=x.device)


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
    return mmd_cov_of(chamfer_matrix(generated, reference))


def mmd_cov_of(d_gr: torch.Tensor) -> dict[str, float]:
    """MMD-CD and COV-CD from the (G, R) Chamfer distances of the generated to the reference clouds."""
    covered = d_gr.argmin(1).unique().numel()
    return {"mmd_cd": float(d_gr.min(0).values.mean()), "cov_cd": float(covered / d_gr.shape[1])}


def one_nna(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy of telling ``generated`` from ``reference`` (Chamfer distance), in [0, 1]."""
    return one_nna_of(chamfer_matrix(generated, generated), chamfer_matrix(generated, reference),
                      chamfer_matrix(reference, reference))


def one_nna_of(d_gg: torch.Tensor, d_gr: torch.Tensor, d_rr: torch.Tensor) -> float:
    """1-NNA from the Chamfer distances within the generated set (G, G), across (G, R) and within the reference
    (R, R)."""
    n_g = d_gg.shape[0]
    top = torch.cat([d_gg, d_gr], dim=1)  # rows: the generated clouds; columns: G then R
    bottom = torch.cat([d_gr.T, d_rr], dim=1)
    d = torch.cat([top, bottom], dim=0).clone()
    d.fill_diagonal_(float("inf"))  # leave one out
    labels = torch.cat([torch.zeros(n_g, dtype=torch.bool), torch.ones(d_rr.shape[0], dtype=torch.bool)])
    predicted = labels.to(d.device)[d.argmin(1)]
    return float((predicted == labels.to(d.device)).float().mean())


def point_metrics(generated: torch.Tensor, reference: torch.Tensor,
                  reference_distances: torch.Tensor | None = None) -> dict[str, float]:
    """``{"mmd_cd", "cov_cd", "1nna_cd"}`` of generated against reference clouds, each Chamfer matrix computed once;
    ``reference_distances``: the reference set's own (R, R) matrix, when several generated sets share one reference."""
    d_gr = chamfer_matrix(generated, reference)
    d_rr = reference_distances if reference_distances is not None else chamfer_matrix(reference, reference)
    return {**mmd_cov_of(d_gr), "1nna_cd": one_nna_of(chamfer_matrix(generated, generated), d_gr, d_rr)}
