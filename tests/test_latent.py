"""Latent ODE, RNN baseline, irregular batches and spiral data (issue #7)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from neuralode.datasets.irregular import IrregularBatch
from neuralode.datasets.spirals import SpiralConfig, make_spirals
from neuralode.models.latent_ode import (
    LatentODE,
    ODERNNEncoder,
    RNNEncoder,
    gaussian_kl,
    pack_observations,
)
from neuralode.models.rnn_baseline import RNNBaseline


def _ragged():
    times = [torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.25, 0.5]), torch.tensor([3.0, 1.0, 0.1, 2.0])]
    values = [torch.randn(len(t), 2) for t in times]
    return times, values


# -- data ------------------------------------------------------------------------------------------
def test_irregular_batch_union_and_masks():
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    assert b.times.tolist() == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0])
    assert b.values.shape == (3, 7, 2) and b.mask.shape == (3, 7)
    assert b.n_observed.tolist() == [3, 2, 4]
    assert (b.values[~b.mask] == 0).all()
    ts, vs = b.to_ragged()
    for t, v, t_in, v_in in zip(ts, vs, times, values):
        order = t_in.argsort()
        torch.testing.assert_close(t, t_in[order])
        torch.testing.assert_close(v, v_in[order])
    sub = b[torch.tensor([1])]  # the union shrinks to what sample 1 observes
    assert sub.times.tolist() == [0.25, 0.5] and sub.mask.all()


def test_irregular_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="repeated"):
        IrregularBatch.from_ragged([torch.tensor([0.0, 0.0])], [torch.zeros(2, 1)])
    with pytest.raises(TypeError, match="bool"):
        IrregularBatch(torch.arange(3.0), torch.zeros(1, 3, 1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="increasing"):
        IrregularBatch(torch.tensor([1.0, 0.0]), torch.zeros(1, 2, 1), torch.ones(1, 2, dtype=torch.bool))


def test_pack_observations_left_aligns_in_time_order():
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    obs_t, obs_x, valid = pack_observations(b.times, b.values, b.mask, pad_time=9.0)
    assert obs_t.shape == (3, 4) and obs_x.shape == (3, 4, 2)
    assert valid.tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]
    assert obs_t[1].tolist() == [0.25, 0.5, 9.0, 9.0]
    assert obs_t[2].tolist() == pytest.approx([0.1, 1.0, 2.0, 3.0])
    torch.testing.assert_close(obs_x[2, 0], values[2][2])  # the observation at t = 0.1


def test_spirals_protocol():
    cfg = SpiralConfig(n_spirals=40, n_train=30, n_obs=7, seed=3)
    d = make_spirals(cfg)
    assert d.times.shape == (200,) and d.clean.shape == (40, 200, 2) and d.noisy.shape == (40, 200, 2)
    assert int(d.clockwise.sum()) == 20  # exactly half each way
    assert (d.obs_mask.sum(1) == 7).all() and not d.obs_mask[:, 100:].any()
    assert set(d.train_idx.tolist()).isdisjoint(d.test_idx.tolist()) and len(d.test_idx) == 10
    again = make_spirals(cfg)
    torch.testing.assert_close(d.noisy, again.noisy, equal_nan=True)
    assert torch.equal(d.obs_mask, again.obs_mask)
    more = make_spirals(cfg, n_obs=50)  # same spirals and noise, only the observation pattern changes
    torch.testing.assert_close(d.noisy, more.noisy, equal_nan=True)
    assert (more.obs_mask.sum(1) == 50).all()
    std = (d.noisy - d.clean)[:, :100].std()
    assert 0.25 < float(std) < 0.35
    # Training spirals are 100-step windows whose futures are unused (NaN); test spirals have all 200 steps,
    # and no test point lies beyond the grid range the training windows cover.
    assert d.noisy[d.train_idx, 100:].isnan().all() and not d.noisy[d.train_idx, :100].isnan().any()
    assert not d.clean[d.test_idx].isnan().any()
    assert int(d.starts[d.test_idx].max()) + 200 <= cfg.start_max + 200
    assert int(d.starts[d.train_idx].max()) + 100 <= cfg.start_max + 200
    b = d.observed("train")
    assert b.values.shape[0] == 30 and b.times.numel() <= 100
    with pytest.raises(ValueError, match="n_obs"):
        SpiralConfig(n_obs=101)
    with pytest.raises(ValueError, match="clockwise_shape"):
        SpiralConfig(clockwise_shape="square")


def test_spirals_validation_split_is_carved_from_the_training_spirals():
    """n_val training spirals become the validation split: the three splits are disjoint and cover the
    data set, the test split is the one without a validation split, validation spirals are windows like
    the test spirals' (all 200 steps), and the split is fixed by the seed."""
    cfg = SpiralConfig(n_spirals=40, n_train=30, n_val=6, n_obs=7, seed=3)
    d = make_spirals(cfg)
    train, val, test = (set(d.split(s).tolist()) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (24, 6, 10)
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert train | val | test == set(range(40))
    plain = make_spirals(cfg, n_val=0)
    assert torch.equal(plain.test_idx, d.test_idx) and set(plain.train_idx.tolist()) == train | val
    torch.testing.assert_close(plain.noisy[d.test_idx], d.noisy[d.test_idx])
    assert not d.noisy[d.val_idx].isnan().any() and d.noisy[d.train_idx, 100:].isnan().all()
    assert int(d.starts[d.val_idx].max()) <= cfg.start_max
    assert d.observed("val").values.shape[0] == 6 and d.training()[0].values.shape[0] == 24
    again = make_spirals(cfg)
    assert torch.equal(again.val_idx, d.val_idx) and torch.equal(again.train_idx, d.train_idx)
    other = make_spirals(cfg, seed=4)
    assert not torch.equal(other.val_idx, d.val_idx)
    with pytest.raises(ValueError, match="split='val' is empty"):
        plain.split("val")
    with pytest.raises(ValueError, match="n_val"):
        SpiralConfig(n_spirals=40, n_train=30, n_val=30)


def test_spirals_forecasting_horizon():
    """train_horizon=200: training spirals have 200 steps; the encoder mask is the observed window only, the
    likelihood mask adds every future step; test spirals are unchanged and their futures never leak."""
    cfg = SpiralConfig(n_spirals=40, n_train=30, n_obs=7, seed=3, train_horizon=200)
    d = make_spirals(cfg)
    assert not d.noisy[d.train_idx].isnan().any()
    assert int(d.starts[d.train_idx].max()) <= cfg.start_max
    short = make_spirals(cfg, train_horizon=100)
    torch.testing.assert_close(d.noisy[d.test_idx], short.noisy[d.test_idx])
    assert torch.equal(d.obs_mask, short.obs_mask)
    batch, enc = d.training()
    assert batch.values.shape == (30, 200, 2) and enc.shape == (30, 200)
    assert torch.equal(enc, d.obs_mask[d.train_idx]) and not enc[:, 100:].any()
    assert batch.mask[:, 100:].all() and torch.equal(batch.mask[:, :100], enc[:, :100])
    b100, enc100 = short.training()
    assert torch.equal(b100.mask, enc100)
    with pytest.raises(ValueError, match="train_horizon"):
        SpiralConfig(train_horizon=201)


def test_elbo_encoder_mask_limits_what_the_encoder_sees():
    """With encoder_mask the encoder ignores the future points, the likelihood scores them."""
    torch.manual_seed(0)
    d = make_spirals(n_spirals=12, n_train=8, n_obs=10, train_horizon=200)
    batch, enc = d.training()
    model = LatentODE(2, 3, enc_hidden=8, dyn_hidden=8, dec_hidden=8, rtol=1e-3, atol=1e-4)
    t_end = float(d.times[99])
    changed = batch.values.clone()
    changed[:, 100:] += 5.0
    torch.manual_seed(1)
    e1 = model.elbo(batch.times, batch.values, batch.mask, 0.0, t_end, encoder_mask=enc)
    torch.manual_seed(1)
    e2 = model.elbo(batch.times, changed, batch.mask, 0.0, t_end, encoder_mask=enc)
    torch.testing.assert_close(e1["mean"], e2["mean"])  # the encoder did not see the future
    assert not torch.allclose(e1["loglik"], e2["loglik"])  # the likelihood did
    with pytest.raises(ValueError, match="encoder_mask"):
        model.elbo(batch.times, batch.values, batch.mask, 0.0, t_end, encoder_mask=enc[:, :5])


@pytest.mark.parametrize("shape", ["mirror", "hyperbolic"])
def test_spiral_directions(shape):
    d = make_spirals(n_spirals=20, n_train=10, clockwise_shape=shape, noise_std=0.0)
    for i in d.test_idx.tolist():
        centre = torch.tensor([-5.0 if d.clockwise[i] else 5.0, 0.0])
        v = d.clean[i] - centre
        dtheta = torch.diff(torch.atan2(v[:, 1], v[:, 0]))
        dtheta = torch.remainder(dtheta + math.pi, 2 * math.pi) - math.pi
        assert (dtheta < 0).all() if d.clockwise[i] else (dtheta > 0).all()
        assert float(v.norm(dim=1).max()) < 5.3


# -- model pieces ----------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """Wraps a recurrent cell and records the first input feature (here: the observation's x) per call."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.seen = cell, []

    def forward(self, inp, h):
        self.seen.append(inp[:, 0].detach().clone())
        return self.cell(inp, h)


@pytest.mark.parametrize("encoder_cls", [RNNEncoder, ODERNNEncoder])
def test_encoder_sees_observations_in_reverse_order(encoder_cls):
    times = [torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.25, 1.0, 1.5, 2.5])]
    values = [torch.stack([t + 1, torch.zeros_like(t)], dim=1) for t in times]  # x[0] = its time + 1
    b = IrregularBatch.from_ragged(times, values)
    enc = encoder_cls(2, 3, 8)
    enc.cell = _Recorder(enc.cell)
    mean, logvar = enc(b.times, b.values, b.mask, torch.tensor(0.0), torch.tensor(3.0))
    assert mean.shape == (2, 3) and logvar.shape == (2, 3)
    seen = torch.stack(enc.cell.seen, dim=1)  # (B, calls)
    for k, t in enumerate(times):  # each sample's real inputs (padding has x = 0) arrive latest first
        real = seen[k][seen[k] != 0]
        assert real.tolist() == sorted((t + 1).tolist(), reverse=True)


@pytest.mark.parametrize("encoder", ["rnn", "ode-rnn"])
def test_unobserved_entries_are_ignored(encoder):
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    model = LatentODE(2, 3, encoder=encoder, enc_hidden=8, dyn_hidden=8, dec_hidden=8)
    garbage = torch.where(b.mask.unsqueeze(-1), b.values, torch.full_like(b.values, 1e3))
    m1, _ = model.encode(b.times, b.values, b.mask, 0.0, 3.0)
    m2, _ = model.encode(b.times, garbage, b.mask, 0.0, 3.0)
    torch.testing.assert_close(m1, m2)
    torch.manual_seed(1)
    e1 = model.elbo(b.times, b.values, b.mask, 0.0, 3.0)
    torch.manual_seed(1)
    e2 = model.elbo(b.times, garbage, b.mask, 0.0, 3.0)
    torch.testing.assert_close(e1["elbo"], e2["elbo"])
    assert e1["pred"].shape == (3, 7, 2) and e1["elbo"].shape == (3,)


def test_analytic_kl_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    logvar = 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    n = 200_000
    z = mean + (0.5 * logvar).exp() * torch.randn(n, 3, 4, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    kl = gaussian_kl(mean, logvar)
    torch.testing.assert_close(kl, mc, atol=0.03, rtol=0.02)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(-1))


@pytest.mark.parametrize("anchor", ["start", "end"])
def test_elbo_improves_on_tiny_problem(anchor):
    torch.manual_seed(0)
    d = make_spirals(n_spirals=10, n_train=8, n_obs=10, noise_std=0.1)
    b = d.observed("train")
    model = LatentODE(
        2, 4, enc_hidden=12, dyn_hidden=12, dec_hidden=12, obs_std=0.3, rtol=1e-2, atol=1e-3, anchor=anchor
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t_end = float(d.times[99])

    def elbo():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(model.elbo(b.times, b.values, b.mask, 0.0, t_end)["elbo"].mean())

    before = elbo()
    for _ in range(20):
        loss = model.elbo(b.times, b.values, b.mask, 0.0, t_end)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert elbo() > before + 0.2 * abs(before)


class _Rotation(nn.Module):
    def forward(self, t, z):
        return torch.stack([-z[..., 1], z[..., 0]], dim=-1)


def test_prediction_backwards_and_forwards_in_time():
    model = LatentODE(2, 2, rtol=1e-7, atol=1e-9)
    model.ode.func = _Rotation()
    model.decoder = nn.Identity()
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    times = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], dtype=torch.float64)
    x = model.predict(z0, 0.0, times)
    c, s = torch.cos(times), torch.sin(times)
    expected = torch.stack([torch.stack([z[0] * c - z[1] * s, z[0] * s + z[1] * c], dim=-1) for z in z0])
    assert x.shape == (2, 5, 2)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    only_back = model.predict(z0, 1.0, torch.tensor([-1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        only_back[:, 1], model.predict(z0, 1.0, torch.tensor([0.5], dtype=torch.float64))[:, 0]
    )


def test_poisson_term_integrates_the_intensity():
    """With a constant intensity c: log p(t_1..t_n) = n log c − c (t_end − t0)."""
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    model = LatentODE(2, 3, enc_hidden=8, dyn_hidden=8, dec_hidden=8, poisson=True, rtol=1e-6, atol=1e-8)
    c = 0.7

    class Const(nn.Module):
        def forward(self, z):
            return torch.full((*z.shape[:-1], 1), c, dtype=z.dtype)

    model.intensity = Const()
    model.ode.func.intensity = model.intensity
    out = model.elbo(b.times, b.values, b.mask, t0=-1.0, t_end=4.0)
    expected = b.n_observed.float() * math.log(c) - c * 5.0
    torch.testing.assert_close(out["poisson_loglik"], expected, atol=1e-4, rtol=1e-4)
    out["loss"].backward()  # gradients flow through the tuple state


# -- RNN baseline ----------------------------------------------------------------------------------
@pytest.mark.parametrize("time_input", [True, False])
def test_rnn_baseline_shapes_and_gaps(time_input):
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    rnn = RNNBaseline(2, 8, time_input=time_input)
    out = rnn.loss(b.times, b.values, b.mask)
    assert out["pred"].shape == (3, 3, 2) and out["target_valid"].sum() == 3 + 2 + 4 - 3
    f1 = rnn.forecast(b.times, b.values, b.mask, torch.tensor([4.0, 4.5, 5.0]))
    f2 = rnn.forecast(b.times, b.values, b.mask, torch.tensor([4.0, 6.0, 8.0]))
    assert f1.shape == (3, 3, 2)
    torch.testing.assert_close(f1[:, 0], f2[:, 0])
    assert time_input == (not torch.allclose(f1[:, 1:], f2[:, 1:]))


# -- command line ----------------------------------------------------------------------------------
SMALL = ["--n-spirals", "24", "--n-train", "16", "--eval-every", "2", "--threads", "1", "--grad-clip", "5"]


def test_cli_train_and_resume(tmp_path):
    pytest.importorskip("matplotlib")
    from neuralode.cli import main

    out = tmp_path / "run"
    base = ["train", "latent", "--obs", "10", "--out", str(out), "--rtol", "1e-2", *SMALL]
    assert main([*base, "--iters", "2", "--no-plots"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert main([*base, "--iters", "4", "--resume", "--plots"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("rmse_extrapolation", "rmse_interpolation", "rmse_extrapolation_noisy", "nfe_forward"):
        assert math.isfinite(m[key])
    for png in ("fig8_reconstructions.png", "fig9_traversal.png", "nfe.png"):
        assert (out / png).exists(), png
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iter"] for x in lines] == [2, 4] and cfg["obs"] == 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--obs", "0"], "obs must be a positive integer, got 0"),
        (["--obs", "101"], "at most 100"),
        (["--batch-size", "-1"], "batch-size must be a non-negative integer, got -1"),
        (["--latent-dim", "0"], "latent-dim must be a positive integer, got 0"),
        (["--lr", "0"], "lr must be a positive finite number"),
        (["--eval-every", "0"], "eval-every must be a positive integer"),
        (["--iters", "-5"], "iters must be a positive integer"),
        (["--n-train", "30", "--n-spirals", "30"], "leaves no test spirals"),
        (["--batch-size", "750"], "batch_size=750 exceeds the 700 training spirals"),
        (["--n-val", "800"], "n_val=800 leaves no training spirals out of n_train=800"),
    ],
)
def test_cli_mistakes_are_usage_errors(tmp_path, capsys, argv, message):
    from neuralode.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "latent", *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_divergence_at_a_huge_lr_is_reported(tmp_path, capsys):
    from neuralode.cli import main

    out = tmp_path / "run"
    argv = ["train", "latent", "--obs", "10", "--iters", "30", "--lr", "1e3", "--rtol", "1e-2", "--no-plots"]
    code = main([*argv, "--out", str(out), *SMALL[:4], "--eval-every", "30"])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged at iteration" in err and "Lower --lr (now 1000)" in err


def test_table2_tiny(tmp_path):
    pytest.importorskip("matplotlib")
    from neuralode.cli import main

    tdir = tmp_path / "t2"
    args = ["table2", "--obs", "5", "--iters", "2", "--runs-dir", str(tdir), "--out", str(tdir), *SMALL]
    assert main([*args, "--models", "rnn"]) == 0
    text = (tdir / "table2.md").read_text()
    assert "RNN (ours, vs clean truth)" in text and (tdir / "fig8_reconstructions_rnn_obs5.png").exists()
    first = (tdir / "rnn-obs5" / "metrics.json").stat().st_mtime_ns
    assert main([*args, "--models", "rnn"]) == 0  # a finished run with the same config is reused
    assert (tdir / "rnn-obs5" / "metrics.json").stat().st_mtime_ns == first


def test_weights_are_selected_on_the_validation_split(tmp_path, capsys):
    """Evaluations during training use the validation split only; best.pt holds the weights of the lowest
    validation RMSE; the test split is evaluated once, with them; `eval latent` reproduces both."""
    from neuralode.cli import main

    out = tmp_path / "run"
    argv = ["train", "latent", "--obs", "10", "--iters", "6", "--out", str(out), "--rtol", "1e-2", "--lr", "0.05",
            "--no-plots", *SMALL]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("rmse_extrapolation" not in r and "val_rmse_extrapolation" in r for r in rows)
    best = min(rows, key=lambda r: r["val_rmse_extrapolation_noisy"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_iter"] == best["iter"] == rows[-1]["selected_iter"]
    assert m["val_rmse_extrapolation"] == best["val_rmse_extrapolation"]
    assert json.loads((out / "config.json").read_text())["n_val"] == 2  # n_train // 8
    capsys.readouterr()
    for split, prefix in (("test", ""), ("val", "val_")):
        assert main(["eval", "latent", str(out), "--split", split]) == 0
        printed = json.loads(capsys.readouterr().out)
        for key in ("rmse_extrapolation", "rmse_interpolation", "rmse_extrapolation_noisy"):
            assert printed[key] == pytest.approx(m[prefix + key], rel=1e-6)


def test_table2_protocol_selects_on_validation_and_reuses_runs(tmp_path, monkeypatch):
    """The validation protocol on a tiny grid: the winner is the configuration of the lowest validation
    RMSE, its tuning run is the first seed's final cell, and a second call trains nothing."""
    from neuralode.experiments import latent

    grid = {"rnn": {"paper": {"rnn_hidden": 4}, "wide": {"rnn_hidden": 12}}}
    base = latent.LatentConfig(n_spirals=24, n_train=16, n_val=4, iters=4, eval_every=2, rtol=1e-2,
                               plots=False, lr=0.05)  # fmt: skip
    kw = {"obs_list": (5,), "models": ("rnn",), "seeds": (0, 1), "tune_obs": 5, "tune_lrs": (), "grid": grid}
    res = latent.run_table2_protocol(base, tmp_path / "runs", tmp_path / "out", **kw)
    scores = {r["config"]: r["val_rmse_extrapolation_noisy"] for r in res["tuning"]}
    win = res["winners"]["rnn"]["config"]
    assert win == min(scores, key=scores.get) and len(res["tuning"]) == 2
    cells = res["final"]["rnn"]["5"]["seeds"]
    assert cells["0"]["folder"] == f"tune/rnn-{win}-lr0.05-obs5-seed0"
    assert cells["1"]["folder"] == f"final/rnn-{win}-lr0.05-obs5-seed1"
    runs = [cells[s]["rmse_extrapolation"] for s in ("0", "1")]
    assert res["final"]["rnn"]["5"]["mean"]["rmse_extrapolation"] == pytest.approx(sum(runs) / 2)
    assert res["final"]["rnn"]["5"]["std"]["rmse_extrapolation"] == pytest.approx(
        abs(runs[0] - runs[1]) / 2**0.5
    )
    assert res["reference"]["rnn"]["5"]["seeds"]["0"]["folder"] == "tune/rnn-paper-lr0.05-obs5-seed0"
    text = (tmp_path / "out" / "table2.md").read_text()
    assert f"**{win}**" in text and "selected on validation" in text and "paper sizes" in text
    monkeypatch.setattr(latent, "_train_cell", lambda args: pytest.fail(f"retrained {args[1]}"))
    again = latent.run_table2_protocol(base, tmp_path / "runs", tmp_path / "out", **kw)
    assert again["final"] == res["final"]


@pytest.mark.slow
def test_table2_both_models_and_seeds_in_parallel(tmp_path):
    pytest.importorskip("matplotlib")
    from neuralode.cli import main

    tdir = tmp_path / "t2"
    assert (
        main(["table2", "--obs", "5", "--iters", "2", "--runs-dir", str(tdir), "--out", str(tdir), *SMALL])
        == 0
    )
    text = (tdir / "table2.md").read_text()
    assert "Latent ODE (paper) | 0.1642" not in text  # obs 5 has no paper number
    assert "RNN (ours, vs clean truth)" in text and (tdir / "fig8_reconstructions_rnn_obs5.png").exists()

    sdir = tmp_path / "t2seeds"
    args = ["table2", "--obs", "5", "--iters", "2", "--runs-dir", str(sdir), "--out", str(sdir)]
    assert main([*args, "--models", "rnn", "--seeds", "0", "1", "--jobs", "2", *SMALL]) == 0
    text = (sdir / "table2.md").read_text()
    assert "mean over seeds 0, 1" in text and "RNN, seed 1 |" in text
    table = json.loads((sdir / "table2.json").read_text())["rnn"]["5"]
    per_seed = [table["seeds"][s]["rmse_extrapolation"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]
    assert math.isclose(table["mean"]["rmse_extrapolation"], sum(per_seed) / 2)
    assert (sdir / "rnn-obs5-seed1" / "metrics.json").exists()


@pytest.mark.parametrize("poisson", [False, True])
def test_adjoint_gradients_match_direct(poisson):
    """The latent ODE (tuple state with the Poisson term included) trains the same with either gradient."""
    times, values = _ragged()
    b = IrregularBatch.from_ragged(times, values)
    # Direct backprop gives the gradient of the discrete solve, the adjoint that of the exact flow: they
    # agree to the solver's accuracy, so solve tightly (torchdiffeq's adjoint differs from direct alike).
    model = LatentODE(2, 3, enc_hidden=6, dyn_hidden=6, dec_hidden=6, poisson=poisson, rtol=1e-10, atol=1e-12)
    model.double()
    grads = {}
    for gradient in ("direct", "adjoint"):
        model.ode.gradient = gradient
        model.zero_grad()
        torch.manual_seed(5)
        model.elbo(b.times.double(), b.values.double(), b.mask, 0.0, 3.0)["loss"].backward()
        grads[gradient] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    scale = float(grads["direct"].abs().max())
    torch.testing.assert_close(grads["adjoint"], grads["direct"], rtol=1e-3, atol=1e-4 * scale)


def test_nested_record_stats_with_equal_counters():
    """Nested recorders (NeuralODE records its own solve inside a caller's block) with equal counters."""
    import neuralode

    node = neuralode.NeuralODE(_Rotation(), t=(0.0, 1.0), method="rk4", options={"step_size": 0.5})
    with neuralode.record_stats() as outer:
        node(torch.ones(1, 2))
        node(torch.ones(1, 2))
    assert outer.nfe == 2 * node.last_stats.nfe > 0


def test_config_sizes_and_optimiser_options():
    from neuralode.experiments.latent import LatentConfig, build_model

    cfg = LatentConfig(latent_dim=6, dec_hidden=50, dyn_hidden=32, dyn_layers=3, grad_clip=1.0)
    model = build_model(cfg)
    assert model.decoder[0].out_features == 50 and model.decoder[0].in_features == 6
    linears = [m for m in model.dynamics.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and linears[0].out_features == 32
    with pytest.raises(ValueError, match="grad-clip must be a finite number >= 0"):
        LatentConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="lr_decay"):
        LatentConfig(lr_decay=0.0)


def test_reuse_ignores_fields_the_model_does_not_use():
    import dataclasses

    from neuralode.experiments.latent import LatentConfig, _same_config

    saved = dataclasses.asdict(LatentConfig(model="latent-ode", rnn_hidden=25))
    assert _same_config(saved, LatentConfig(model="latent-ode", rnn_hidden=48))
    assert not _same_config(saved, LatentConfig(model="latent-ode", dec_hidden=100))
    saved = dataclasses.asdict(LatentConfig(model="rnn", dec_hidden=20))
    assert _same_config(saved, LatentConfig(model="rnn", dec_hidden=100))
    assert not _same_config(saved, LatentConfig(model="rnn", rnn_hidden=48))


def test_encoder_in_time_order_and_end_anchor():
    times = [torch.tensor([0.0, 0.5, 2.0]), torch.tensor([0.25, 1.0, 1.5, 2.5])]
    values = [torch.stack([t + 1, t], dim=1) for t in times]  # x[0] = its time + 1, x[1] = its time
    b = IrregularBatch.from_ragged(times, values)
    enc = RNNEncoder(2, 3, 8, reverse=False)
    enc.cell = _Recorder(enc.cell)
    enc(b.times, b.values, b.mask, torch.tensor(0.0), torch.tensor(3.0))
    seen = torch.stack(enc.cell.seen, dim=1)
    for k, t in enumerate(times):  # real inputs arrive earliest first
        real = seen[k][seen[k] != 0]
        assert real.tolist() == sorted((t + 1).tolist())

    model = LatentODE(2, 2, anchor="end", rtol=1e-7, atol=1e-9).double()
    assert model.anchor_time(0.0, 3.0) == 3.0 and not model.encoder.reverse
    model.ode.func = _Rotation()
    model.decoder = nn.Identity()
    torch.manual_seed(0)
    out = model.elbo(b.times, b.values.double(), b.mask, 0.0, 3.0)
    # the decoded trajectory passes through the sampled state at t_end = 3: rotate it back by 3 − t
    z_end = out["z0"]
    ang = 3.0 - b.times.double()
    c, s = torch.cos(ang), torch.sin(ang)
    expected = torch.stack(
        [z_end[:, :1] * c + z_end[:, 1:] * s, -z_end[:, :1] * s + z_end[:, 1:] * c], dim=-1
    )
    torch.testing.assert_close(out["pred"], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="anchor"):
        LatentODE(2, 2, anchor="middle")
    with pytest.raises(ValueError, match="anchor='end'"):
        LatentODE(2, 2, anchor="end", encoder="ode-rnn")
