"""The CNF command line: tiny end-to-end runs that write the run folder, resume, and Figure 4."""

from __future__ import annotations

import json

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments.cnf import CNFConfig, train_cnf


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny 2-D problems: one thread is faster, and far faster on a shared, loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")


def test_train_cnf_writes_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "cnf"
    args = ["train", "cnf", "--dataset", "8gaussians", "--field", "mlp", "--hidden", "8-8", "--batch-size", "32",
            "--eval-every", "2", "--eval-size", "200", "--rtol", "1e-3", "--atol", "1e-3", "--kinetic", "0.01",
            "--jacobian", "0.01", "--divergence", "hutchinson", "--out", str(out)]  # fmt: skip
    assert main([*args, "--iters", "2", "--no-plots"]) == 0
    assert main([*args, "--iters", "4", "--resume", "--plots"]) == 0  # resumable options may change
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_nll",
        "test_nll",
        "nfe_forward",
        "nfe_backward",
        "true_test_nll",
        "kinetic",
        "jacobian",
    ):
        assert key in m
    assert m["nfe_forward"] > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(v)["iter"] for v in lines] == [2, 4]
    for name in (
        "config.json",
        "checkpoint.pt",
        "density.png",
        "samples.png",
        "flow.png",
        "vector_field.png",
    ):
        assert (out / name).exists(), name


def test_train_nf_and_figure4(tmp_path):
    out = tmp_path / "nf"
    # the old spellings (--data, --n-test, --batch) stay accepted
    assert main(["train", "nf", "--data", "moons", "--layers", "4", "--iters", "3", "--eval-every", "3",
                 "--n-test", "100", "--batch", "64", "--out", str(out)]) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "moons" and cfg["eval_size"] == 100 and cfg["batch_size"] == 64
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_nll"] > 0 and (out / "nf.png").exists()
    out = tmp_path / "fig4"
    assert main(["figure4", "--targets", "U1", "--sizes", "2", "--nf-iters", "2", "--cnf-iters", "2",
                 "--eval-size", "200", "--rtol", "1e-3", "--atol", "1e-3", "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "figure4.json").read_text())
    assert set(r["kl"]) == {"U1/nf/2", "U1/cnf/2"}
    assert (out / "figure4.png").exists() and (out / "figure4_loss.png").exists()


def test_bad_data_name(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: usage error listing the choices
        main(["train", "cnf", "--dataset", "spiral", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dataset='spiral' is unknown"):
        train_cnf(CNFConfig(dataset="spiral"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("cmd", "argv", "message"),
    [
        ("cnf", ["--iters", "0"], "iters must be a positive integer, got 0"),
        ("cnf", ["--iters", "-5"], "iters must be a positive integer, got -5"),
        ("nf", ["--iters", "0"], "iters must be a positive integer, got 0"),
        ("cnf", ["--lr", "0"], "lr must be a positive finite number"),
        ("cnf", ["--eval-every", "0"], "eval-every must be a positive integer"),
        ("nf", ["--eval-size", "0"], "eval-size must be a positive integer"),
        ("cnf", ["--hidden", "8-x"], "hidden='8-x' must be widths"),
        ("cnf", ["--device", "cuda:x"], "is not a device"),
    ],
)
def test_fake_metric_arguments_are_rejected(tmp_path, capsys, cmd, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", cmd, *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_resume_refuses_changed_options_and_schedule_bound_budget(tmp_path, capsys):
    out = tmp_path / "nf"
    base = ["train", "nf", "--layers", "2", "--iters", "2", "--eval-every", "2", "--eval-size", "50",
            "--lr-schedule", "cosine", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(base) == 0
    capsys.readouterr()
    for extra, message in (
        (["--optimizer", "rmsprop"], "--optimizer rmsprop differs from the resumed run's optimizer='adam'"),
        (["--iters", "4"], "--iters 4 differs"),  # the cosine schedule spans the original budget
    ):
        with pytest.raises(SystemExit):
            main(["train", "nf", "--out", str(out), "--resume", *extra])
        assert message in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["optimizer"] == "adam"


def test_cnf_divergence_is_reported(tmp_path, capsys):
    out = tmp_path / "cnf"
    code = main(["train", "cnf", "--dataset", "8gaussians", "--field", "mlp", "--hidden", "8", "--batch-size",
                 "32", "--eval-size", "50", "--iters", "40", "--eval-every", "1", "--lr", "1e3", "--max-steps",
                 "30", "--no-plots", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "training diverged at iteration" in err and "Traceback" not in err


def test_help_lists_only_options_the_command_has_as_resumable(capsys):
    for name, absent in (("nf", "--max-steps"), ("cnf", None)):
        with pytest.raises(SystemExit) as exc:
            main(["train", name, "--help"])
        assert exc.value.code == 0
        resumable = capsys.readouterr().out.split("resumable (may change with --resume):")[1]
        assert "--iters" in resumable and (absent is None or absent not in resumable)
        if absent is None:
            assert "--max-steps" in resumable and "--eval-tol" in resumable
