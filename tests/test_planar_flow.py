"""The planar flow's differentiable inverse: exact values, implicit-function gradients."""

import pytest
import torch

from neuralode.models.planar_flow import PlanarFlow, PlanarNF


def _flow(seed=0, layers=5):
    torch.manual_seed(seed)
    return PlanarFlow(2, layers, init_std=1.5).double()


def test_inverse_and_log_det_match_the_forward_pass():
    flow = _flow()
    z = torch.randn(40, 2, dtype=torch.float64)
    y, logdet = flow(z)
    z_back, logdet_back = flow.inverse_and_log_det(y)
    torch.testing.assert_close(z_back, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_back, logdet, rtol=1e-10, atol=1e-10)


def test_inverse_jacobian_is_the_inverse_of_the_forward_jacobian():
    flow = _flow(1)
    y = torch.randn(2, dtype=torch.float64)
    j_inv = torch.autograd.functional.jacobian(lambda v: flow.inverse(v.unsqueeze(0))[0], y)
    z = flow.inverse(y.unsqueeze(0))[0].detach()
    j_fwd = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0][0], z)
    torch.testing.assert_close(j_inv @ j_fwd, torch.eye(2, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_base_to_data_log_prob_gradient_matches_finite_differences():
    torch.manual_seed(2)
    nf = PlanarNF(2, 4, direction="base_to_data").double()
    with torch.no_grad():
        nf.flow.u.mul_(100)  # far from the identity, so the path through z = F⁻¹(x) matters
    x = 1.5 * torch.randn(16, 2, dtype=torch.float64)
    params = list(nf.parameters())
    grads = torch.autograd.grad(nf.log_prob(x).mean(), params)
    eps = 1e-6
    for p, g in zip(params, grads):
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = nf.log_prob(x).mean()
                p.view(-1)[i] -= 2 * eps
                down = nf.log_prob(x).mean()
                p.view(-1)[i] += eps
            assert float(g.view(-1)[i]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-5, abs=1e-7)


def test_inverse_rejects_bad_iters():
    with pytest.raises(ValueError, match="iters"):
        _flow().inverse(torch.zeros(1, 2, dtype=torch.float64), iters=0)
