"""The spiral demo (`neuralode demo` / `neuralode train spiral`): run folder, exact resume, bad options."""

import json

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments.spiral import PLOT_FILES, SpiralConfig, make_spiral_data

# Small and loose: each run takes well under a second of training.
TINY = ["--data-size", "120", "--hidden", "8", "--rtol", "1e-4", "--atol", "1e-6", "--eval-every", "2"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the command sets its own thread count


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_cli_tiny_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "spiral", "--iters", "4", *TINY, "--out", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["iters"] == 4 and config["hidden"] == 8 and config["method"] == "dopri5"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 2, 4]
    assert records[0]["train_l1"] is None and records[-1]["train_l1"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "final_loss",
        "best_loss",
        "initial_loss",
        "nfe_forward",
        "nfe_backward",
        "wall_time_s",
        "iters",
    ):
        assert key in metrics, key
    assert metrics["iters"] == 4
    assert metrics["final_loss"] == records[-1]["eval_l1"]
    assert metrics["best_loss"] == min(r["eval_l1"] for r in records)
    assert metrics["nfe_forward"] >= 4 * 2  # at least two evaluations per solve
    ckpt = _weights(out)
    assert ckpt["step"] == 4 and ckpt["schema"] == 2 and ckpt["experiment"] == "spiral"
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "config", "task"}
    assert "batch_rng" in ckpt["task"] and ckpt["config"]["hidden"] == 8
    run = json.loads((out / "run.json").read_text())
    assert run["torch"] == torch.__version__ and run["launches"][-1]["status"] == "completed"
    assert config["device"] == "cpu" and config["threads"] == 1 and config["experiment"] == "spiral"
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_demo_command_is_registered(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--iters", "1", *TINY, "--no-plots", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["iters"] == 1
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_resume_is_bit_exact(tmp_path, gradient):
    common = ["train", "spiral", *TINY, "--gradient", gradient, "--no-plots"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    main([*common, "--iters", "6", "--out", str(straight)])
    main([*common, "--iters", "3", "--out", str(split)])
    main(["train", "spiral", "--resume", str(split), "--iters", "6", "--no-plots"])

    a, b = _weights(straight), _weights(split)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["square_avg"], pb["square_avg"])
    assert torch.equal(a["task"]["batch_rng"], b["task"]["batch_rng"])
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((split / "metrics.json").read_text())
    # (best_loss may differ: the split run also evaluated at iteration 3)
    for key in ("final_loss", "initial_loss", "nfe_forward", "nfe_backward", "iters"):
        assert ma[key] == mb[key], key
    # the resumed log continues the first part's log: evaluations at 0, 2, 3 (end of part 1), 4, 6
    assert [json.loads(r)["iter"] for r in (split / "metrics.jsonl").read_text().splitlines()] == [
        0,
        2,
        3,
        4,
        6,
    ]


def test_resume_rejects_changed_config_and_missing_runs(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "spiral", "--iters", "2", *TINY, "--no-plots", "--out", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "spiral", "--resume", str(out), "--lr", "0.01", "--iters", "4"])
    assert exc.value.code == 2
    assert "--lr 0.01 differs from the resumed run's lr=0.001" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "spiral", "--resume", str(tmp_path / "nowhere")])
    assert "--resume: no checkpoint.pt in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "spiral", "--iters", "2", *TINY, "--no-plots", "--out", str(out)])
    assert "already holds a run (" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "spiral", "--resume", str(out), "--iters", "1"])
    assert "is at iteration 2, past the requested budget of 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iters", "0"], "iters must be a positive integer, got 0"),
        (["--iters", "-5"], "iters must be a positive integer, got -5"),
        (["--iters", "x"], "argument --iters: expected an integer, got 'x'"),
        (["--lr", "-0.001"], "lr must be a positive finite number, got -0.001"),
        (["--lr", "0"], "lr must be a positive finite number, got 0.0"),
        (["--eval-every", "0"], "eval-every must be a positive integer, got 0"),
        (["--batch-size", "-1"], "batch-size must be a positive integer, got -1"),
        (["--max-steps", "0"], "max-steps must be a positive integer, got 0"),
        (["--rtol", "nan"], "rtol must be a positive finite number, got nan"),
        (["--method", "rk45"], "argument --method: invalid choice: 'rk45'"),
        (["--gradient", "magic"], "argument --gradient: invalid choice: 'magic'"),
        (["--data-size", "100", "--batch-size", "95"], "batch_size=95 exceeds the 90 possible window starts"),
        (["--batch-time", "1"], "batch_time must be at least 2"),
        (["--device", "tpu:x"], "device='tpu:x' is not a device"),
        (["--method", "implicit_adams", "--compile"], "compile=True needs an explicit Runge-Kutta method"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "spiral", *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "spiral", "--device", "cuda", "--out", str(tmp_path / "never")])
    assert "device='cuda' was requested but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_config_validates_when_used_from_python():
    with pytest.raises(ValueError, match="lr must be a positive finite number"):  # a UsageError
        SpiralConfig(lr=0.0)
    with pytest.raises(ValueError, match="method='rk45' is not a solver"):
        SpiralConfig(method="rk45")
    with pytest.raises(ValueError, match="batch_time=1000 must be smaller than data_size=1000"):
        SpiralConfig(batch_time=1000)


def test_ground_truth_is_the_spiral():
    t, y = make_spiral_data(1000, 25.0)
    assert t.shape == (1000,) and y.shape == (1000, 2) and y.dtype == torch.float32
    assert torch.equal(y[0], torch.tensor([2.0, 0.0]))
    radius = y.norm(dim=1)
    assert radius[-1] < 0.5 * radius[0]  # the spiral decays inwards
    # dy/dt = y³·A at (2, 0) is (-0.8, 16): y rises fast while x barely moves
    assert y[3, 1] > 0.5 and abs(y[3, 0] - 2.0) < 0.2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_run_trains_and_records_the_option(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "spiral", "--iters", "4", *TINY, "--compile", "--no-plots", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["compile"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["initial_loss"]
