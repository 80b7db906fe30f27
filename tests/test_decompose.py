import pytest
import torch

from cstar_fx.decompose import (eckart_young_error, mode_spectra, project, relative_error, svd_factors,
                                 svd_reconstruct, tucker2_factors, tucker2_reconstruct)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_svd_full_rank_exact_and_truncated_is_eckart_young(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in range(1, min(shape) + 1):
        first, second = svd_factors(w, r)
        assert first.shape == (r, shape[1]) and second.shape == (shape[0], r)
        err = torch.linalg.matrix_norm(svd_reconstruct(first, second) - w).item()
        bound = s[r:].pow(2).sum().sqrt().item()
        assert err == pytest.approx(bound, rel=1e-9, abs=1e-12)
        assert eckart_young_error(w, r) == pytest.approx(bound, rel=1e-9, abs=1e-12)


def test_svd_rank_deficient_weight_is_handled():
    w = torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)
    first, second = svd_factors(w, 5)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert torch.allclose(second @ first, w, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (5, 7, 3, 1), (6, 3, 1, 5)])
def test_tucker2_full_rank_exact(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    c_out, c_in, kh, kw = shape
    u_in, core, u_out = tucker2_factors(w, min(c_out, c_in * kh * kw), min(c_in, c_out * kh * kw))
    assert torch.allclose(tucker2_reconstruct(u_in, core, u_out), w, atol=1e-12)
    assert torch.allclose(u_in.T @ u_in, torch.eye(u_in.shape[1], dtype=torch.float64), atol=1e-10)


def test_tucker2_truncated_error_within_hosvd_bound_and_energy_identity():
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    s0, s1 = mode_spectra(w)
    for r_out, r_in in [(4, 4), (8, 3), (16, 12), (2, 10)]:
        u_in, core, u_out = tucker2_factors(w, r_out, r_in)
        approx = tucker2_reconstruct(u_in, core, u_out)
        err2 = (approx - w).pow(2).sum().item()
        assert err2 <= s0.discarded(r_out) + s1.discarded(r_in) + 1e-9
        # orthogonal projection: ||W||^2 = ||core||^2 + ||W - W_hat||^2
        assert w.pow(2).sum().item() == pytest.approx(core.pow(2).sum().item() + err2, rel=1e-10)


def test_mode_spectra_are_squared_singular_values():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    s0, s1 = mode_spectra(w)
    ref0 = torch.linalg.svdvals(w.reshape(6, -1)).pow(2)
    ref1 = torch.linalg.svdvals(w.permute(1, 0, 2, 3).reshape(4, -1)).pow(2)
    assert torch.allclose(torch.tensor(s0.sq, dtype=torch.float64), ref0, rtol=1e-8)
    assert torch.allclose(torch.tensor(s1.sq, dtype=torch.float64), ref1, rtol=1e-8)
    assert s0.total == pytest.approx(w.pow(2).sum().item())
    assert s0.kept_energy(6) == pytest.approx(1.0)


def test_project_has_requested_rank():
    w = torch.randn(10, 8, dtype=torch.float64)
    assert torch.linalg.matrix_rank(project(w, (3,))).item() == 3
    conv = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    z = project(conv, (4, 2))
    assert torch.linalg.matrix_rank(z.reshape(8, -1)).item() == 4
    assert torch.linalg.matrix_rank(z.permute(1, 0, 2, 3).reshape(6, -1)).item() == 2
    assert relative_error(project(w, (8,)), w) < 1e-10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_rejected(bad):
    w = torch.randn(4, 4)
    w[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd_factors(w, 2)


def test_bad_rank_rejected():
    with pytest.raises(ValueError, match="rank must be an int"):
        svd_factors(torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match="rank_in"):
        tucker2_factors(torch.randn(4, 2, 3, 3), 2, 3)
