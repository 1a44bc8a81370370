import pytest
import torch
import torch.nn.functional as F

from neuralode.models.odenet import MLP, ODENet, ResNet, build_model, count_parameters

# EXPERIMENTS.md §2.3
PARAMS = {
    ("odenet", "conv"): 208_266,
    ("odenet", "res"): 232_970,
    ("rknet", "conv"): 208_266,
    ("resnet", "conv"): 576_778,
    ("resnet", "res"): 601_482,
}


@pytest.mark.parametrize(("name", "down"), list(PARAMS))
def test_parameter_counts_match_the_spec(name, down):
    assert count_parameters(build_model(name, downsampling=down)) == PARAMS[(name, down)]


def test_mlp_parameter_count():
    assert count_parameters(build_model("mlp")) == 784 * 300 + 300 + 300 * 10 + 10 == 238_510


def test_component_counts():
    m = ODENet()
    assert count_parameters(m.downsampling) == 132_096
    assert count_parameters(m.odefunc) == 75_392
    assert count_parameters(m.head) == 778


@pytest.mark.parametrize("name", ["odenet", "rknet", "resnet", "mlp"])
def test_shapes_and_gradients(name):
    kw = {} if name == "mlp" else {"channels": 8}
    if name in ("odenet", "rknet"):
        kw.update(method="rk4", options={"step_size": 0.5})  # cheap; dopri5 is checked below
    model = build_model(name, **kw)
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_odenet_counts_forward_and_backward_evaluations():
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        dp = ODENet(channels=8, rtol=1e-2, atol=1e-2)
        dp(x)
        assert dp.odefunc.nfe >= 8 and (dp.odefunc.nfe - 2) % 6 == 0  # dopri5: 2 + 6k
    model = ODENet(channels=8, gradient="adjoint", method="rk4", options={"step_size": 0.5})
    model.odefunc.nfe = 0
    out = model(x)
    assert model.odefunc.nfe == 8
    model.odefunc.nfe = 0
    out.sum().backward()
    assert model.odefunc.nfe > 0
    # direct backprop (RK-Net) never calls the vector field backward
    rk = build_model("rknet", channels=8, method="rk4", options={"step_size": 0.5})
    o = rk(x)
    rk.odefunc.nfe = 0
    o.sum().backward()
    assert rk.odefunc.nfe == 0


def test_feature_map_shapes():
    assert ODENet(channels=8).features(torch.rand(2, 1, 28, 28)).shape == (2, 8, 6, 6)
    assert ODENet(channels=8, downsampling="res").features(torch.rand(2, 1, 28, 28)).shape == (2, 8, 7, 7)


def test_time_enters_the_vector_field():
    f = ODENet(channels=8).odefunc
    h = torch.rand(2, 8, 6, 6)
    assert not torch.allclose(f(torch.tensor(0.0), h), f(torch.tensor(1.0), h))


def test_bad_arguments():
    with pytest.raises(ValueError, match="model='vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="gradient must be 'direct'"):
        build_model("rknet", gradient="adjoint")
    with pytest.raises(ValueError, match="downsampling='pool'"):
        ODENet(downsampling="pool")
    assert isinstance(build_model("resnet"), ResNet) and isinstance(build_model("mlp"), MLP)
