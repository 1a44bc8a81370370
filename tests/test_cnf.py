"""Continuous normalizing flows, the planar NF baseline and the 2-D toy data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode.models.cnf as cnf_mod
from neuralode.datasets.toy2d import (
    REFERENCE_LOG_PROBS,
    TARGET_ENERGIES,
    TOY_DATASETS,
    gaussians8_log_prob,
    sample_toy,
    target_log_normalizer,
)
from neuralode.models.cnf import (
    CNF,
    ConcatSquashMLP,
    GatedPlanarField,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
)
from neuralode.models.planar_flow import PlanarFlow, PlanarNF


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny 2-D problems: one thread is faster, and far faster on a shared, loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LinearField(nn.Module):
    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z @ self.a.T


def _grid(half: float, n: int, dtype=torch.float64):
    h = 2 * half / n
    c = -half + h * (torch.arange(n, dtype=dtype) + 0.5)
    return torch.cartesian_prod(c, c), h


# --- the change of variables ---------------------------------------------------------------------------


def test_linear_field_log_density_change_is_t_trace():
    a = torch.tensor([[0.3, -1.0], [0.7, -0.5]], dtype=torch.float64)
    big_t = 1.7
    model = CNF(LinearField(a), 2, end_time=big_t, divergence="exact").double()
    z0 = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        x, logq = model.sample(z=z0, with_log_prob=True, divergence="exact")
    change = model.base_log_prob(z0) - logq  # = ∫ tr = T·tr(A)
    torch.testing.assert_close(
        change, torch.full_like(change, big_t * a.trace().item()), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(x, z0 @ torch.linalg.matrix_exp(big_t * a).T, rtol=1e-4, atol=1e-5)


def test_exact_divergence_matches_analytic_planar_trace():
    field = GatedPlanarField(2, width=8).double()
    t = torch.tensor(0.3, dtype=torch.float64)
    z = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    div, _ = divergence_exact(field(t, z), z, create_graph=False)
    torch.testing.assert_close(div, field.divergence(t, z).detach())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_within_standard_error(kind):
    field = ConcatSquashMLP(2, (16, 16)).double()
    t = torch.tensor(0.2, dtype=torch.float64)
    z0 = torch.randn(1, 2, dtype=torch.float64)
    n = 20000
    z = z0.expand(n, 2).clone().requires_grad_(True)
    f = field(t, z)
    exact, _ = divergence_exact(f, z, create_graph=True)
    g = torch.Generator().manual_seed(1)
    est, _ = divergence_hutchinson(f, z, sample_noise(z, kind, g), create_graph=False)
    se = est.std() / math.sqrt(n)
    assert abs(est.mean() - exact[0]) < 3 * se + 1e-12
    # and the variance is the textbook one (J is not symmetric: use its symmetric part)
    j = torch.autograd.functional.jacobian(lambda v: field(t, v), z0)[0, :, 0, :]
    s = 0.5 * (j + j.T)
    var = 2 * s.pow(2).sum() if kind == "gaussian" else 2 * (s.pow(2).sum() - s.diagonal().pow(2).sum())
    assert abs(est.var() - var) < 0.1 * var + 1e-9


def test_noise_is_drawn_once_per_solve_and_held_fixed(monkeypatch):
    draws = []

    def spy(like, kind, generator=None):
        e = sample_noise(like, kind, generator)
        draws.append(e)
        return e

    monkeypatch.setattr(cnf_mod, "sample_noise", spy)
    a = torch.tensor([[0.5, 1.0], [-2.0, 0.1]], dtype=torch.float64)
    model = CNF(LinearField(a), 2, divergence="hutchinson", gradient="adjoint", rtol=1e-8, atol=1e-8).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    out = model(x)
    out.log_prob.sum().backward()
    assert len(draws) == 1  # one draw for the forward solve; the adjoint backward reuses it
    assert out.dynamics.n_evals > 10  # many evaluations, one noise
    # for a linear field, held-fixed noise makes dlogp/dt constant: log p(x) - log p0(z) = -T εᵀAε exactly
    e = draws[0]
    quad = ((e @ a.T) * e).sum(-1)
    torch.testing.assert_close(out.log_prob.detach() - model.base_log_prob(out.z.detach()), -quad)
    # a second solve draws fresh noise
    model(x)
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])


# --- density, sampling, gradients ---------------------------------------------------------------------


def _trained_small_cnf(field, steps=15, **kw):
    torch.manual_seed(0)
    model = CNF(field, 2, **kw).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = sample_toy("moons", 64, generator=g, dtype=torch.float64)
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_learned_density_integrates_to_one():
    model = _trained_small_cnf(
        ConcatSquashMLP(2, (16, 16)), steps=10, end_time=0.5, learn_end_time=True, rtol=1e-5, atol=1e-5
    )
    assert model.end_time().item() != 0.5  # the end time trained
    pts, h = _grid(6.0, 80)
    with torch.no_grad():
        p = model.log_prob(pts).exp()
    mass = (p.sum() * h * h).item()
    assert abs(mass - 1) < 0.01, mass


@pytest.mark.parametrize("field", ["planar", "mlp"])
def test_data_base_data_round_trip_within_10x_tol(field):
    f = GatedPlanarField(2, 8) if field == "planar" else ConcatSquashMLP(2, (16, 16))
    tol = 1e-6
    model = _trained_small_cnf(f, steps=3, rtol=tol, atol=tol)
    x = sample_toy("moons", 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        z = model.transform(x, 1.0, 0.0)
        x_back = model.sample(z=z)
    # in the solver's own error norm (RMS of error / (atol + rtol |x|)), as the tolerance is defined
    ratio = ((x_back - x) / (tol + tol * x.abs())).pow(2).mean().sqrt()
    assert ratio < 10, ratio


@pytest.mark.parametrize(
    ("gradient", "divergence", "adjoint_options"),
    [
        ("adjoint", "exact", None),
        ("adjoint", "hutchinson", {"norm": "seminorm"}),
        ("checkpoint", "hutchinson", None),
    ],
)
def test_gradient_methods_match_direct(gradient, divergence, adjoint_options):
    torch.manual_seed(0)
    field = ConcatSquashMLP(2, (8, 8)).double()
    x = sample_toy("circles", 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for method in ("direct", gradient):
        model = CNF(field, 2, end_time=0.7, learn_end_time=True, divergence=divergence, regularize=True,
                    rtol=1e-8, atol=1e-8, gradient=method, adjoint_options=adjoint_options)  # fmt: skip
        model = model.double()
        torch.manual_seed(5)  # same Hutchinson noise for both
        out = model(x)
        loss = -out.log_prob.mean() + 0.1 * out.kinetic.mean() + 0.1 * out.jacobian.mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
        assert out.stats.nfe > 0
        if method != "direct":
            assert out.stats.nfe_backward > 0  # backward solves are reported through record_stats
    assert len(grads[0]) == len(list(field.parameters())) + 1  # the end time is a parameter
    for gd, ga in zip(*grads):
        torch.testing.assert_close(ga, gd, rtol=1e-5, atol=1e-7)


def test_regularisers_match_closed_form_for_linear_field():
    a = torch.tensor([[0.2, -0.4], [0.1, 0.3]], dtype=torch.float64)
    model = CNF(LinearField(a), 2, end_time=1.0, regularize=True, rtol=1e-10, atol=1e-10).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    out = model(x)
    assert torch.allclose(out.jacobian, torch.full_like(out.jacobian, a.pow(2).sum().item() / 2))
    assert (out.kinetic > 0).all()


def test_reports_stats_and_bad_input():
    model = CNF(GatedPlanarField(2, 4), 2)
    out = model(torch.randn(5, 2))
    assert out.stats is model.last_stats
    assert out.dynamics.n_evals >= 2 and out.stats.nfe == out.dynamics.n_evals
    with pytest.raises(ValueError, match="divergence"):
        CNF(GatedPlanarField(2, 4), 2, divergence="trace")
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        model(torch.randn(5, 3))
    with pytest.raises(ValueError, match="noise"):
        sample_noise(torch.zeros(2), "uniform")


# --- planar NF -----------------------------------------------------------------------------------------


def test_planar_flow_constraint_inverse_and_logdet():
    torch.manual_seed(0)
    flow = PlanarFlow(2, 6, init_std=1.5).double()
    assert ((flow.w * flow.u_hat()).sum(-1) > -1).all()
    z = torch.randn(50, 2, dtype=torch.float64)
    y, logdet = flow(z)
    torch.testing.assert_close(flow.inverse(y), z, rtol=1e-9, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0][0], z[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize("direction", ["data_to_base", "base_to_data"])
def test_planar_nf_density_integrates_to_one(direction):
    torch.manual_seed(0)
    nf = PlanarNF(2, 4, direction=direction).double()
    with torch.no_grad():
        for p in nf.flow.parameters():
            p.mul_(8)
        pts, h = _grid(8.0, 150)
        mass = (nf.log_prob(pts).exp().sum() * h * h).item()
        x, lq = nf.sample_with_log_prob(20)
        torch.testing.assert_close(lq, nf.log_prob(x), rtol=1e-7, atol=1e-7)
    assert abs(mass - 1) < 0.01


# --- toy data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_data_shapes_and_seeding(name):
    a = sample_toy(name, 101, generator=torch.Generator().manual_seed(0))
    b = sample_toy(name, 101, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape[1] == 2
    assert a.shape[0] == (100 if name == "pinwheel" else 101)
    assert a.abs().max() < 20


def test_gaussians8_log_prob_is_normalised_and_matches_samples():
    pts, h = _grid(6.0, 300)
    assert abs(gaussians8_log_prob(pts).exp().sum().item() * h * h - 1) < 1e-3
    x = sample_toy("8gaussians", 50000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # differential entropy ≈ 1 + log(2π s²) + log 8 with s = 0.5 / 1.414 (components barely overlap)
    s2 = (0.5 / 1.414) ** 2
    assert abs(-gaussians8_log_prob(x).mean().item() - (1 + math.log(2 * math.pi * s2) + math.log(8))) < 0.02


def test_targets_and_bad_names():
    for name in TARGET_ENERGIES:
        assert math.isfinite(target_log_normalizer(name, n=201))
    with pytest.raises(ValueError, match="toy data set"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="target"):
        target_log_normalizer("U9")


def test_reference_densities_of_moons_and_circles_are_normalised():
    pts, h = _grid(6.0, 120)  # h = 0.1 against a blur of std 0.2: the midpoint rule is exact to ~1e-9
    for name in ("moons", "circles"):
        mass = REFERENCE_LOG_PROBS[name](pts).exp().sum().item() * h * h
        assert abs(mass - 1) < 1e-3, (name, mass)
