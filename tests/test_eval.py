"""``neuralode eval``: a run folder's selected weights re-evaluated on the test split reproduce the
run's own ``metrics.json`` test entries; a folder that is not a run of that experiment is an error."""

from __future__ import annotations

import json

import pytest
import torch

from _cli import usage_error as _usage_error
from _mnist_common import MNIST_DIR, needs_mnist
from neuralode.cli import main


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _eval(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _same(printed: dict, run) -> None:
    saved = json.loads((run / "metrics.json").read_text())
    assert printed and set(printed) <= set(saved)
    for key, value in printed.items():
        assert value == saved[key], key  # same weights, data, device and threads: the same numbers


FLOW = ["--iters", "3", "--eval-every", "2", "--eval-size", "300", "--batch-size", "32", "--no-plots",
        "--threads", "1"]  # fmt: skip


def test_eval_cnf_and_nf_reproduce_the_test_nll(tmp_path, capsys):
    cnf, nf = tmp_path / "cnf", tmp_path / "nf"
    cnf_opts = [
        "--dataset",
        "8gaussians",
        "--field",
        "mlp",
        "--hidden",
        "8-8",
        "--rtol",
        "1e-3",
        "--atol",
        "1e-3",
    ]
    assert main(["train", "cnf", *FLOW, *cnf_opts, "--eval-tol", "1e-4", "--out", str(cnf)]) == 0
    assert main(["train", "nf", *FLOW, "--layers", "3", "--out", str(nf)]) == 0
    printed = _eval(capsys, "cnf", str(cnf))
    assert {"test_nll", "n_test", "true_test_nll"} <= set(printed) and printed["n_test"] == 300
    _same(printed, cnf)
    _same(_eval(capsys, "nf", str(nf)), nf)
    assert "holds a 'nf' run, not a 'cnf' run" in _usage_error(capsys, "eval", "cnf", str(nf))
    assert "no config.json" in _usage_error(capsys, "eval", "nf", str(tmp_path))
    (nf / "checkpoint.pt").write_bytes(b"")
    err = _usage_error(capsys, "eval", "nf", str(nf))
    assert str(nf / "checkpoint.pt") in err and "empty" in err


def test_eval_latent_reproduces_the_rmses(tmp_path, capsys):
    out = tmp_path / "latent"
    argv = ["train", "latent", "--obs", "10", "--iters", "3", "--eval-every", "2", "--n-spirals", "24",
            "--n-train", "16", "--rtol", "1e-2", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = _eval(capsys, "latent", str(out))
    assert {"rmse_extrapolation", "rmse_interpolation", "nfe_forward"} <= set(printed)
    _same(printed, out)
    assert "not a `neuralode train latent` run folder" in _usage_error(
        capsys, "eval", "latent", str(tmp_path / "none")
    )


@needs_mnist
def test_eval_mnist_reproduces_the_test_error(tmp_path, capsys):
    out = tmp_path / "mnist"
    argv = ["train", "mnist", "--data-dir", str(MNIST_DIR), "--epochs", "1", "--train-size", "256",
            "--val-size", "128", "--test-size", "128", "--channels", "4", "--batch-size", "64",
            "--eval-batch-size", "64", "--threads", "1", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = _eval(capsys, "mnist", str(out))
    assert set(printed) == {"test_error", "test_loss", "test_nfe_forward"}
    _same(printed, out)
    (out / "best.pt").unlink()
    assert "no weights at" in _usage_error(capsys, "eval", "mnist", str(out))
    err = _usage_error(capsys, "eval", "mnist", str(out), "--data-dir", str(tmp_path / "empty"))
    assert "mnist files missing in" in err
