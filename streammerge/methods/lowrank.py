"""Low-rank factors of a task vector τ = θ − θ₀ (extract-lora): exact SVD, or a randomized SVD over row blocks.

Pure functions of τ, which they see either whole (`exact_svd`) or through `read(r0, r1)`, a function
giving rows r0..r1 of τ in float64 (`randomized_svd`, `relative_error`), so a tensor never has to be
in memory whole.

Randomized SVD: Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 53(2),
2011: Algorithm 4.4 (randomized subspace iteration, q power iterations with a QR after every
product, which keeps the small singular values from drowning in rounding) followed by Algorithm 5.1
(the SVD of the small matrix Qᵀτ). Every product with τ runs over fixed row blocks:

    Y = τ Ω        block by block (rows of Y are independent: no reduction between blocks)
    Z = τᵀ Q       = Σ_b τ_bᵀ Q_b, summed in float64 in row order

The row blocks depend on τ's shape alone (`row_blocks`), never on the memory budget or the thread
count, and Ω comes from a generator seeded per tensor on the CPU, so the factors are the same bytes
for the same seed with any budget. Thread counts: a BLAS matrix product gives the same bits with any
number of threads (MKL and OpenBLAS split the rows and columns of the output among threads, not the
sum), but LAPACK's QR and SVD do not (checked on MKL 2024.2), so those run on one thread (`_one_thread`);
sums of squares reduce each row first, then the rows in order.

Error bound (HMT 2011, Corollary 10.10): with l = k + p columns (p ≥ 2) and q power iterations,

    E ‖τ − Q Qᵀ τ‖  ≤  [ (1 + √(k/(p−1)) + e√(k+p)/p · √(min(m,n) − k) )^(1/(2q+1)) ] · σ_{k+1}

in the spectral norm: with q = 2 the factor in brackets is about 3 for the shapes of LLM
weights, so the randomized factors are within a small factor of the best rank-k error; in practice
(the benchmark) their Frobenius error is within a fraction of a percent of the exact SVD's. The
reported error is measured, not bounded: ‖τ − B A‖_F / ‖τ‖_F with the factors as written.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 20  # elements of τ per row block (8 MiB in float64): a function of the shape alone
RowReader = Callable[[int, int], torch.Tensor]  # rows [r0, r1) of τ, float64, on the working device


@dataclass(frozen=True)
class RankRule:
    """How many components to keep: at most `max_rank`; fewer where mergekit's `sv_epsilon` (an absolute
    singular-value threshold: σ ≤ ε dropped) or `energy` (the fewest components whose σ² reach this
    fraction of ‖τ‖²_F) says so."""

    max_rank: int
    sv_epsilon: float = 0.0
    energy: float | None = None


@dataclass(frozen=True)
class Svd:
    """The leading singular triplets of τ (float64): τ ≈ u · diag(s) · vh, k = len(s) components kept."""

    u: torch.Tensor  # m × k
    s: torch.Tensor  # k
    vh: torch.Tensor  # k × n
    norm_sq: float  # ‖τ‖²_F, exact (float64 sum in row order)
    method: str  # "exact" | "randomized"


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """The fixed row blocks of an rows × cols τ: BLOCK_ELEMENTS elements each (at least one row)."""
    step = max(1, BLOCK_ELEMENTS // max(1, cols))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def choose_rank(s: torch.Tensor, norm_sq: float, rule: RankRule) -> int:
    """The rank kept from singular values `s` (descending) of a τ with ‖τ‖²_F = norm_sq."""
    k = min(rule.max_rank, len(s))
    if norm_sq == 0.0:
        return 0
    if rule.sv_epsilon > 0:
        k = min(k, int((s > rule.sv_epsilon).sum()))
    if rule.energy is not None:
        captured = torch.cumsum(s.double() ** 2, 0) / norm_sq
        reached = (captured >= rule.energy * (1 - 1e-12)).nonzero()
        if len(reached):
            k = min(k, int(reached[0]) + 1)
    k = min(k, int((s > 0).sum()))  # a zero singular value adds nothing
    return k


def exact_svd(tau: torch.Tensor, rule: RankRule) -> Svd:
    """The truncated SVD of τ from its full thin SVD in float64 (LAPACK gesdd)."""
    tau = tau.double()
    norm_sq = float(_sum_sq(tau))
    if norm_sq == 0.0:
        return _empty(tau.shape, norm_sq, "exact", tau.device)
    with _one_thread(tau):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    k = choose_rank(s, norm_sq, rule)
    return Svd(u[:, :k], s[:k], vh[:k], norm_sq, "exact")


def randomized_svd(read: RowReader, shape: tuple[int, int], rule: RankRule, *, seed: int, oversample: int = 10,
                   power_iters: int = 2, device: torch.device | str = "cpu") -> Svd:
    """The truncated SVD of τ (rows × cols, read by `read`) by randomized subspace iteration (HMT 2011,
    Alg. 4.4 + 5.1), 2q + 2 passes over τ in its fixed row blocks. Memory: the m × l and n × l factors
    and one block, l = min(k + oversample, m, n)."""
    m, n = shape
    blocks = row_blocks(m, n)
    l = min(rule.max_rank + oversample, m, n)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, l, generator=gen, dtype=torch.float64).to(device)  # on the CPU: the same numbers everywhere
    norm_sq = torch.zeros((), dtype=torch.float64, device=device)
    y = torch.empty(m, l, dtype=torch.float64, device=device)
    for r0, r1 in blocks:  # Y = τ Ω, and ‖τ‖²_F on the way
        block = read(r0, r1)
        norm_sq += _sum_sq(block)
        torch.mm(block, omega, out=y[r0:r1])
    norm_sq = float(norm_sq)
    if norm_sq == 0.0:
        return _empty(shape, 0.0, "randomized", device)
    del omega
    for _ in range(power_iters):  # (τ τᵀ)^q τ Ω, re-orthonormalized after each product (HMT Alg. 4.4)
        q = _orthonormal(y)
        z = _orthonormal(_t_times(read, blocks, q))
        for r0, r1 in blocks:
            torch.mm(read(r0, r1), z, out=y[r0:r1])
    q = _orthonormal(y)
    del y
    bt = _t_times(read, blocks, q)  # Bᵀ = τᵀ Q (n × l): B = Qᵀ τ, the small matrix of HMT Alg. 5.1
    with _one_thread(bt):
        w, s, vh_t = torch.linalg.svd(bt, full_matrices=False)  # Bᵀ = W S Xᵀ, so B = X S Wᵀ
    k = choose_rank(s, norm_sq, rule)
    u = q @ vh_t[:k].T  # U = Q X
    return Svd(u, s[:k], w[:, :k].T.contiguous(), norm_sq, "randomized")


def _t_times(read: RowReader, blocks: list[tuple[int, int]], q: torch.Tensor) -> torch.Tensor:
    """τᵀ q = Σ_b τ_bᵀ q_b, the block products added in float64 in row order (one fixed reduction order)."""
    out = None
    for r0, r1 in blocks:
        part = read(r0, r1).T @ q[r0:r1]
        out = part if out is None else out.add_(part)
    return out


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    with _one_thread(y):
        return torch.linalg.qr(y)[0]


def _sum_sq(block: torch.Tensor) -> torch.Tensor:
    """Σ block², each row summed first (one thread per row), then the row sums in order: the same
    bits with any thread count."""
    return (block * block).sum(1).sum()


@contextmanager
def _one_thread(t: torch.Tensor) -> Iterator[None]:
    """LAPACK on the CPU on one thread: MKL's QR and SVD give other bits with other thread counts."""
    if t.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _empty(shape: tuple[int, ...], norm_sq: float, method: str, device) -> Svd:
    m, n = shape
    z = torch.zeros
    return Svd(z(m, 0, dtype=torch.float64, device=device), z(0, dtype=torch.float64, device=device),
               z(0, n, dtype=torch.float64, device=device), norm_sq, method)


def lora_factors(svd: Svd, distribute_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = u diag(s) vh, as mergekit splits them: √s on each side (distribute_scale),
    else A = diag(s) vh and B = u. Signs are made canonical (each column of B sums to ≥ 0), so the
    factors do not depend on a LAPACK's sign choice."""
    u, s, vh = svd.u, svd.s, svd.vh
    sign = torch.where(u.sum(0) < 0, -1.0, 1.0).to(u.dtype)
    u, vh = u * sign, vh * sign[:, None]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh, u * root
    return s[:, None] * vh, u


def relative_error(read: RowReader, shape: tuple[int, int], a: torch.Tensor, b: torch.Tensor, norm_sq: float) -> float:
    """‖τ − B A‖_F / ‖τ‖_F in float64, over τ's row blocks in row order (0 for τ = 0)."""
    if norm_sq == 0.0:
        return 0.0
    a, b = a.double(), b.double()
    err = torch.zeros((), dtype=torch.float64, device=a.device)
    for r0, r1 in row_blocks(*shape):
        diff = read(r0, r1) - b[r0:r1] @ a
        err += _sum_sq(diff)
    return math.sqrt(float(err) / norm_sq)


def exact_bytes(shape: tuple[int, int]) -> int:
    """Working memory of `exact_svd` on an m × n τ: τ, u and vh and LAPACK's workspace, in float64."""
    m, n = shape
    small = min(m, n)
    return 8 * (3 * m * n + 4 * small * small)


def randomized_bytes(shape: tuple[int, int], rank: int, oversample: int) -> int:
    """Working memory of `randomized_svd`: the m × l and n × l factors (a few of each at once) and a
    block of τ with its products."""
    m, n = shape
    l = min(rank + oversample, m, n)
    block = min(m, max(1, BLOCK_ELEMENTS // max(1, n))) * n
    return 8 * (3 * m * l + 3 * n * l + 4 * block)


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's test matrix Ω: a hash of the run's seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
