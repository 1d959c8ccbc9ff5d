"""Post-merge representation alignment: closed forms against float64 references and the toy guarantee."""
import torch

from cmerge.alignment import apply_map, feature_discrepancy, gradient_align, ridge_diagonal, ridge_linear


def _problem(n=200, d=12, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w_true = torch.randn(p, d, generator=g)
    b_true = torch.randn(p, generator=g)
    y = h @ w_true.T + b_true + 0.1 * torch.randn(n, p, generator=g)
    w_cur = w_true + 0.5 * torch.randn(p, d, generator=g)   # the drifted (merged) projection
    b_cur = b_true + 0.5 * torch.randn(p, generator=g)
    return h, y, w_cur, b_cur


def _objective(h, y, w, b, w_cur, ridge):
    pred = h.double() @ w.double().T + (0 if b is None else b.double())
    return float(((pred - y.double()) ** 2).sum(1).mean() + ridge * ((w.double() - w_cur.double()) ** 2).sum())


def test_ridge_linear_solves_the_normal_equations():
    h, y, w_cur, b_cur = _problem()
    ridge = 0.05
    w, b = ridge_linear(h, y, w_cur, b_cur, ridge=ridge)
    # float64 reference: gradient of the objective vanishes at the optimum
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True)
    value = ((h.double() @ w64.T + b64 - y.double()) ** 2).sum(1).mean() + ridge * ((w64 - w_cur.double()) ** 2).sum()
    value.backward()
    assert w64.grad.abs().max() < 1e-4 and b64.grad.abs().max() < 1e-4
    # and it beats small perturbations
    base = _objective(h, y, w, b, w_cur, ridge)
    for s in range(5):
        dw = 1e-2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(s))
        assert _objective(h, y, w + dw, b, w_cur, ridge) > base


def test_ridge_linear_without_bias_and_large_ridge_stays_at_current():
    h, y, w_cur, _ = _problem()
    w, b = ridge_linear(h, y, w_cur, None, ridge=1e9)
    assert b is None
    assert torch.allclose(w, w_cur, atol=1e-5)


def test_alignment_strictly_reduces_feature_discrepancy():
    h, y, w_cur, b_cur = _problem(seed=3)
    before = feature_discrepancy(apply_map(h, w_cur, b_cur, False), y)
    w, b = ridge_linear(h, y, w_cur, b_cur, ridge=1e-3)
    after = feature_discrepancy(apply_map(h, w, b, False), y)
    assert after < 0.5 * before
    # on held-out inputs from the same distribution too
    h2, y2, _, _ = _problem(seed=3, n=400)
    assert feature_discrepancy(apply_map(h2, w, b, False), y2) < feature_discrepancy(apply_map(h2, w_cur, b_cur, False), y2)


def test_ridge_diagonal_matches_per_feature_least_squares():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(300, 6, generator=g)
    gamma_true, beta_true = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    y = u * gamma_true + beta_true + 0.05 * torch.randn(300, 6, generator=g)
    gamma, beta = ridge_diagonal(u, y, torch.ones(6), torch.zeros(6), ridge=0.0)
    for j in range(6):  # float64 reference: ordinary least squares on [u_j, 1]
        a = torch.stack([u[:, j].double(), torch.ones(300, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(a, y[:, j].double().unsqueeze(1)).solution.squeeze()
        assert abs(float(gamma[j]) - float(coef[0])) < 1e-5 and abs(float(beta[j]) - float(coef[1])) < 1e-5
    before = feature_discrepancy(u, y)
    assert feature_discrepancy(apply_map(u, gamma, beta, True), y) < before


def test_gradient_alignment_approaches_the_closed_form():
    h, y, w_cur, b_cur = _problem(n=100, d=6, p=4, seed=5)
    ridge = 0.1
    w_cf, b_cf = ridge_linear(h, y, w_cur, b_cur, ridge=ridge)
    w_gd, b_gd = gradient_align(h, y, w_cur, b_cur, lr=0.05, steps=1500, ridge=ridge)
    assert _objective(h, y, w_gd, b_gd, w_cur, ridge) <= _objective(h, y, w_cf, b_cf, w_cur, ridge) * 1.01
    assert torch.allclose(w_gd, w_cf, atol=5e-2)


def test_reference_learning_rate_is_nearly_a_no_op():
    h, y, w_cur, b_cur = _problem(seed=7)
    w, b = gradient_align(h, y, w_cur, b_cur, lr=1e-7, steps=50)
    assert (w - w_cur).abs().max() < 1e-4
    before = feature_discrepancy(apply_map(h, w_cur, b_cur, False), y)
    after = feature_discrepancy(apply_map(h, w, b, False), y)
    assert after < before and after > 0.99 * before
