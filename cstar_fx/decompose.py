"""Pure low-rank maths: SVD, Tucker-2 (HOSVD) and spatial-SVD factors, spectra and reconstruction errors.

Nothing here knows about modules or graphs; every function takes and returns tensors, so the
maths can be tested against the dense weights directly.

Conventions
-----------
* A linear weight ``W`` is ``(out, in)``; a conv weight is ``(C_out, C_in, kh, kw)``.
* SVD factors ``(first, second)`` satisfy ``W ~= second @ first`` with ``first`` of shape ``(r, in)``
  and ``second`` of shape ``(out, r)``; the singular values are split evenly (``sqrt(s)`` on
  each side) so that both factors have the same scale when fine-tuned.
* Tucker-2 factors ``(u_in, core, u_out)`` satisfy
  ``W ~= core x_0 u_out x_1 u_in``, i.e. ``W[o,i] = sum_rs u_out[o,r] core[r,s] u_in[i,s]``, with
  ``u_in`` ``(C_in, R_in)``, ``core`` ``(R_out, R_in, kh, kw)``, ``u_out`` ``(C_out, R_out)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from .errors import CstarTypeError, CstarValueError

__all__ = [
    "Spectrum",
    "svd_factors",
    "svd_reconstruct",
    "tucker2_factors",
    "tucker2_reconstruct",
    "mode_spectra",
    "project",
    "eckart_young_error",
    "relative_error",
    "svd_factors_data",
    "tucker2_factors_data",
    "spatial_svd_factors_data",
]


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    # SVD in half precision is unsupported and inaccurate; float64 input stays float64 so tests can be exact.
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _check_weight(w: torch.Tensor, ndim: tuple[int, ...]) -> None:
    if not isinstance(w, torch.Tensor):
        raise CstarTypeError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if w.ndim not in ndim:
        raise CstarValueError(f"expected a weight with {' or '.join(map(str, ndim))} dims, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise CstarValueError("weight contains NaN or Inf; fix or re-initialise the layer before factorizing it")


def _check_rank(rank: int, full: int, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
        raise CstarValueError(f"{what} must be an int in [1, {full}], got {rank!r}")


@dataclass(frozen=True)
class Spectrum:
    """Squared singular values of one unfolding, largest first, with their total.

    Example:
        >>> s = mode_spectra(torch.eye(3))[0]
        >>> round(s.kept_energy(2), 4)
        0.6667
    """

    sq: tuple[float, ...]

    @property
    def total(self) -> float:
        """Sum of the squared singular values (the squared Frobenius norm)."""
        return float(sum(self.sq))

    def kept_energy(self, rank: int) -> float:
        """Fraction of the energy in the leading ``rank`` singular values (1.0 for a zero tensor)."""
        total = self.total
        return 1.0 if total <= 0.0 else float(sum(self.sq[:rank])) / total

    def discarded(self, rank: int) -> float:
        """Sum of the squared singular values beyond ``rank``."""
        return float(sum(self.sq[rank:]))


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def _left_eig(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of ``mat @ mat.T``, largest first: ``(s^2, U)`` (U = left singular vectors).

    The Gram matrix is much cheaper to decompose than ``mat`` itself when ``mat`` is wide, which is
    the common case for conv unfoldings; its small eigenvalues lose relative precision, which the
    energy fractions and the leading factors used here do not need. ``mat`` is scaled to a largest
    entry of 1 first, so weights of any finite magnitude neither overflow nor underflow the Gram
    matrix (the squared values come back in float64, rescaled); where ``eigh`` still fails to
    converge, the SVD of ``mat`` answers instead.
    """
    scale = float(mat.abs().max()) if mat.numel() else 0.0
    if scale == 0.0:
        eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
        return torch.zeros(mat.shape[0], dtype=torch.float64, device=mat.device), eye
    unit = mat / scale
    try:
        evals, evecs = torch.linalg.eigh(unit @ unit.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
    except torch.linalg.LinAlgError:
        u, sv, _ = torch.linalg.svd(unit, full_matrices=True)
        evals = torch.zeros(mat.shape[0], dtype=unit.dtype, device=unit.device)
        evals[: sv.numel()] = sv.square()
        evecs = u
    return evals.double().clamp_min(0.0) * scale ** 2, evecs


def _leading_left(mat: torch.Tensor, rank: int) -> torch.Tensor:
    if mat.shape[0] <= mat.shape[1]:
        return _left_eig(mat)[1][:, :rank]
    u, _, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :rank]


def _squared_singular_values(mat: torch.Tensor) -> torch.Tensor:
    """Squared singular values, largest first, in float64 (scale-free: see :func:`_left_eig`)."""
    small = mat if mat.shape[0] <= mat.shape[1] else mat.T
    return _left_eig(small)[0]


def mode_spectra(weight: torch.Tensor) -> tuple[Spectrum, ...]:
    """Spectra used by the allocator: one for a 2-D weight, (mode-0, mode-1) for a 4-D conv weight.

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> out_mode, in_mode = mode_spectra(w)
        >>> len(out_mode.sq), len(in_mode.sq)
        (8, 4)
    """
    _check_weight(weight, (2, 4))
    if weight.numel() == 0:
        raise CstarValueError(f"weight of shape {tuple(weight.shape)} has no "
                              "entries (a zero-width layer); nothing to factorize")
    w = weight.detach().to(_work_dtype(weight))
    modes = (0,) if w.ndim == 2 else (0, 1)
    return tuple(Spectrum(tuple(_squared_singular_values(_unfold(w, m)).tolist())) for m in modes)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a 2-D weight: ``(first (r, in), second (out, r))`` with ``W ~= second @ first``.

    Example:
        >>> w = torch.randn(6, 5, dtype=torch.float64)
        >>> a, b = svd_factors(w, 5)
        >>> torch.allclose(b @ a, w)
        True
    """
    _check_weight(weight, (2,))
    _check_rank(rank, min(weight.shape), "rank")
    w = weight.detach().to(_work_dtype(weight))
    wide = w.shape[0] <= w.shape[1]
    basis = _left_eig(w if wide else w.T)[1][:, :rank]  # U_r (out side) or V_r (in side)
    if wide:
        first, second = _balanced(basis.T @ w, basis)  # U_r^T W (r, in), U_r
    else:
        second_t, first_t = _balanced((w @ basis).T, basis)  # (W V_r)^T, V_r
        first, second = first_t.T, second_t.T
    return first.to(weight.dtype), second.to(weight.dtype)


def _balanced(proj: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proj (r, in), basis (out, r))`` rescaled so both carry ``sqrt`` of each component's norm.

    The product ``basis @ proj`` is unchanged; balancing only evens the two factors' scales for
    fine-tuning (norms guarded so rank-deficient weights work).
    """
    big = float(proj.abs().max()) if proj.numel() else 0.0
    # Norms of the unit-scaled rows: the squares of 1e20-sized entries would overflow float32.
    norms = torch.linalg.vector_norm(proj / big, dim=1) * big if big > 0 else torch.linalg.vector_norm(proj, dim=1)
    root = norms.clamp_min(float(norms.max()) * 1e-12 if norms.numel() else 0.0).clamp_min(1e-30).sqrt()
    return proj / root[:, None], basis * root[None, :]


def _check_moment(moment: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(moment, torch.Tensor) or moment.shape != (dim, dim):
        raise CstarValueError(f"expected an input second-moment matrix of shape ({dim}, {dim}), "
                              f"got {tuple(getattr(moment, 'shape', ()))}")
    if not torch.isfinite(moment).all():
        raise CstarValueError("the input second-moment matrix contains NaN or Inf; check the calibration inputs")
    m = moment.detach().to(torch.float64)
    m = 0.5 * (m + m.T)
    # A ridge keeps the solves defined for rank-deficient inputs (e.g. dead ReLU channels); it
    # leaves full-rank factorizations exact (see tucker2_factors_data).
    ridge = 1e-6 * float(m.diagonal().mean()) if dim else 0.0
    return m + (ridge if ridge > 0 else 1e-12) * torch.eye(dim, dtype=m.dtype, device=m.device)


def _top_eigvecs(sym: torch.Tensor, rank: int) -> torch.Tensor:
    scale = float(sym.abs().max())
    if scale == 0.0 or not math.isfinite(scale):
        return torch.eye(sym.shape[0], rank, dtype=sym.dtype, device=sym.device)
    _, vecs = torch.linalg.eigh(sym / scale)  # normalised: scale-free whatever the weights' magnitude
    return vecs.flip(1)[:, :rank]


def svd_factors_data(weight: torch.Tensor, rank: int, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware truncated SVD: the rank-``rank`` weight that best preserves the layer's *outputs*.

    ``moment`` is the second moment ``E[x x^T]`` of the layer's inputs (``(in, in)``; for a conv
    treated as a matrix, of its unfolded patches). Minimises ``E||W x - W' x||^2`` exactly: ``W'``
    projects ``W x`` onto the top ``rank`` principal directions of the outputs, the eigenvectors of
    ``W E[x x^T] W^T`` (Eckart-Young on ``W X``). Same factor layout as :func:`svd_factors`; exact
    at full rank.

    Example:
        >>> w, x = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, 100, dtype=torch.float64)
        >>> a, b = svd_factors_data(w, 2, x @ x.T / 100)
        >>> ((b @ a - w) @ x).norm() <= ((svd_reconstruct(*svd_factors(w, 2)) - w) @ x).norm()
        tensor(True)
    """
    _check_weight(weight, (2,))
    _check_rank(rank, min(weight.shape), "rank")
    c = _check_moment(moment, weight.shape[1])
    w = weight.detach().to(torch.float64)
    u = _top_eigvecs(w @ c.to(w.device) @ w.T, rank)
    first, second = _balanced(u.T @ w, u)
    return first.to(weight.dtype), second.to(weight.dtype)


def _sym_sqrt(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(c)
    root = evals.clamp_min(float(evals.max()) * 1e-12 if evals.numel() else 0.0).sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return (evecs * root) @ evecs.T, (evecs * inv) @ evecs.T


def _channel_moment(patch_moment: torch.Tensor, c_in: int, taps: int) -> torch.Tensor:
    # The patch vector is ordered (channel, tap): average the per-tap channel blocks.
    blocks = patch_moment.reshape(c_in, taps, c_in, taps)
    return blocks.diagonal(dim1=1, dim2=3).mean(-1)


def _whitened_reduction(gram: torch.Tensor, patch_moment: torch.Tensor, groups: int, taps: int,
                        rank: int) -> torch.Tensor:
    """``(rank, groups)``: the reduction of each tap's ``groups`` inputs to the top ``rank`` directions of the
    weight's input Gram matrix ``gram`` after whitening by the tap-averaged input moment (the reduction that
    best preserves the outputs when different taps are treated as uncorrelated)."""
    root, inv_root = _sym_sqrt(_check_moment(_channel_moment(patch_moment, groups, taps), groups))
    return _top_eigvecs(root @ gram @ root, rank).T @ inv_root


def _output_fit(w0: torch.Tensor, patch_moment: torch.Tensor, reduce: torch.Tensor,
                taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares map ``(out, rank * taps)`` from the per-tap reduced patches to the layer's outputs
    ``w0 @ p`` (it compensates for what the reduction drops), and the reduced patches' moment."""
    k = torch.kron(reduce, torch.eye(taps, dtype=w0.dtype, device=w0.device))  # per-tap reduction of a patch
    c_zz = k @ patch_moment @ k.T
    return torch.linalg.solve(c_zz, (w0 @ patch_moment @ k.T).T).T, c_zz


def spatial_svd_factors_data(weight: torch.Tensor, rank: int,
                             patch_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware spatial SVD of a conv weight: a ``kh x 1`` conv to ``rank`` channels, then a ``1 x kw`` conv,
    chosen to preserve the conv's outputs on the inputs.

    ``patch_moment`` is ``E[p p^T]`` over the layer's unfolded input patches (ordered channel, kernel row, kernel
    column, as ``weight.reshape(C_out, -1)``). The height conv is the whitened reduction of each column of a
    patch (as Tucker-2's input factor, with a (channel, row) pair in place of a channel) and the width conv is
    the least-squares fit of the outputs from the reduced columns. Returns ``(height (rank, C_in, kh), width
    (C_out, rank, kw))``, each component's two halves scaled alike; exact at full rank ``min(C_in*kh, C_out*kw)``.

    Example:
        >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
        >>> p = torch.randn(36, 500, dtype=torch.float64)
        >>> height, width = spatial_svd_factors_data(w, 12, p @ p.T / 500)
        >>> torch.allclose(torch.einsum("riy,orx->oiyx", height, width), w)
        True
    """
    _check_weight(weight, (4,))
    c_out, c_in, kh, kw = weight.shape
    _check_rank(rank, min(c_in * kh, c_out * kw), "rank")
    c = _check_moment(patch_moment, c_in * kh * kw)
    w = weight.detach().to(torch.float64)
    c = c.to(w.device)
    rows = w.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)  # (channel, row) x (out, column)
    height = _whitened_reduction(rows @ rows.T, c, c_in * kh, kw, rank)
    width = _output_fit(w.reshape(c_out, -1), c, height, kw)[0].reshape(c_out, rank, kw)
    # even the two halves' scales (the product is unchanged), as the other factorizations do for fine-tuning
    a, b = torch.linalg.vector_norm(height, dim=1), torch.linalg.vector_norm(width, dim=(0, 2))
    scale = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
    height, width = height * scale[:, None], width / scale[None, :, None]
    return height.reshape(rank, c_in, kh).to(weight.dtype), width.to(weight.dtype)


def tucker2_factors_data(weight: torch.Tensor, rank_out: int, rank_in: int,
                         patch_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data-aware Tucker-2 of a conv weight: factors chosen to preserve the conv's outputs on the inputs.

    ``patch_moment`` is ``E[p p^T]`` over the layer's unfolded input patches ``p`` (ordered channel,
    then kernel position, as ``weight.reshape(C_out, -1)``). The input factor is the whitened
    HOSVD one (the reduction that best preserves the outputs when neighbouring taps are treated as
    uncorrelated), the core is the least-squares fit of the layer's outputs from the reduced inputs
    (it compensates for what the reduction drops), and the output factor holds the top principal
    directions of that fit, which is the optimal output projection for the given reduction.
    Returns ``(reduce (C_in, R_in), core, u_out (C_out, R_out))`` in the layout of
    :func:`tucker2_factors` (``reduce`` is not orthonormal); exact at full ranks.

    Example:
        >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
        >>> p = torch.randn(36, 500, dtype=torch.float64)
        >>> u_in, core, u_out = tucker2_factors_data(w, 8, 4, p @ p.T / 500)
        >>> torch.allclose(tucker2_reconstruct(u_in, core, u_out), w)
        True
    """
    _check_weight(weight, (4,))
    c_out, c_in, kh, kw = weight.shape
    taps = kh * kw
    _check_rank(rank_out, min(c_out, c_in * taps), "rank_out")
    _check_rank(rank_in, min(c_in, c_out * taps), "rank_in")
    c = _check_moment(patch_moment, c_in * taps)
    w = weight.detach().to(torch.float64)
    c = c.to(w.device)
    reduce = _whitened_reduction(_unfold(w, 1) @ _unfold(w, 1).T, c, c_in, taps, rank_in)
    fit, c_zz = _output_fit(w.reshape(c_out, -1), c, reduce, taps)
    u_out = _top_eigvecs(fit @ c_zz @ fit.T, rank_out)
    core = (u_out.T @ fit).reshape(rank_out, rank_in, kh, kw)
    return reduce.T.to(weight.dtype), core.to(weight.dtype), u_out.to(weight.dtype)

def svd_reconstruct(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The low-rank weight ``second @ first``.

    Example:
        >>> svd_reconstruct(torch.ones(1, 3), torch.ones(2, 1)).shape
        torch.Size([2, 3])
    """
    return second @ first


def tucker2_factors(weight: torch.Tensor, rank_out: int, rank_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HOSVD Tucker-2 of a conv weight on its two channel modes.

    Returns ``(u_in (C_in, R_in), core (R_out, R_in, kh, kw), u_out (C_out, R_out))``; the core is
    ``W x_0 u_out^T x_1 u_in^T``.

    Example:
        >>> w = torch.randn(8, 4, 3, 1, dtype=torch.float64)
        >>> u_in, core, u_out = tucker2_factors(w, 8, 4)
        >>> torch.allclose(tucker2_reconstruct(u_in, core, u_out), w)
        True
    """
    _check_weight(weight, (4,))
    c_out, c_in = weight.shape[:2]
    _check_rank(rank_out, min(c_out, c_in * weight.shape[2] * weight.shape[3]), "rank_out")
    _check_rank(rank_in, min(c_in, c_out * weight.shape[2] * weight.shape[3]), "rank_in")
    w = weight.detach().to(_work_dtype(weight))
    u_out = _leading_left(_unfold(w, 0), rank_out)
    u_in = _leading_left(_unfold(w, 1), rank_in)
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_in.to(weight.dtype), core.to(weight.dtype), u_out.to(weight.dtype)


def tucker2_reconstruct(u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor) -> torch.Tensor:
    """The Tucker-2 weight ``core x_0 u_out x_1 u_in``.

    Example:
        >>> tucker2_reconstruct(torch.ones(4, 2), torch.ones(3, 2, 3, 3), torch.ones(5, 3)).shape
        torch.Size([5, 4, 3, 3])
    """
    return torch.einsum("rshw,or,is->oihw", core, u_out, u_in)


def project(weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
    """The best-effort low-rank projection of ``weight`` at ``ranks`` (SVD for 2-D, Tucker-2 for 4-D).

    A 1x1 conv weight with a single rank is treated as a matrix. This is the "Z" step of CSTAR's
    ADMM: the budget-constrained projection of ``W + U``.

    Example:
        >>> w = torch.randn(6, 4)
        >>> float(torch.linalg.matrix_rank(project(w, (2,))))
        2.0
    """
    if weight.ndim == 4 and len(ranks) == 1:
        flat = weight.reshape(weight.shape[0], -1)
        return svd_reconstruct(*svd_factors(flat, ranks[0])).reshape(weight.shape)
    if weight.ndim == 2 and len(ranks) == 1:
        return svd_reconstruct(*svd_factors(weight, ranks[0]))
    if weight.ndim == 4 and len(ranks) == 2:
        return tucker2_reconstruct(*tucker2_factors(weight, ranks[0], ranks[1]))
    raise CstarValueError(f"cannot project a weight of shape {tuple(weight.shape)} at ranks {ranks}")


def eckart_young_error(weight: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-``rank`` approximation: ``sqrt(sum_{i>rank} s_i^2)``.

    Example:
        >>> eckart_young_error(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 1)
        2.236...
    """
    return mode_spectra(weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1))[0].discarded(rank) ** 0.5


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    """``||approx - weight||_F / ||weight||_F`` (0.0 when both are zero).

    Example:
        >>> relative_error(torch.ones(2), torch.ones(2))
        0.0
    """
    denom = float(torch.linalg.vector_norm(weight.double()))
    err = float(torch.linalg.vector_norm((approx - weight).double()))
    return 0.0 if denom == 0.0 else err / denom
