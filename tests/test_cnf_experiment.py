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
    args = ["train", "cnf", "--data", "8gaussians", "--field", "mlp", "--hidden", "8-8", "--batch", "32",
            "--eval-every", "2", "--n-test", "200", "--rtol", "1e-3", "--atol", "1e-3", "--kinetic", "0.01",
            "--jacobian", "0.01", "--divergence", "hutchinson", "--out", str(out)]  # fmt: skip
    assert main([*args, "--iters", "2", "--no-plots"]) == 0
    assert main([*args, "--iters", "4", "--resume"]) == 0
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
    assert main(["train", "nf", "--data", "moons", "--layers", "4", "--iters", "3", "--eval-every", "3",
                 "--n-test", "100", "--out", str(out)]) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_nll"] > 0 and (out / "nf.png").exists()
    out = tmp_path / "fig4"
    assert main(["figure4", "--targets", "U1", "--sizes", "2", "--nf-iters", "2", "--cnf-iters", "2",
                 "--n-eval", "200", "--rtol", "1e-3", "--atol", "1e-3", "--out", str(out)]) == 0  # fmt: skip
    r = json.loads((out / "figure4.json").read_text())
    assert set(r["kl"]) == {"U1/nf/2", "U1/cnf/2"}
    assert (out / "figure4.png").exists() and (out / "figure4_loss.png").exists()


def test_bad_data_name(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: usage error listing the choices
        main(["train", "cnf", "--data", "spiral", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="toy data set"):
        train_cnf(CNFConfig(data="spiral", out=str(tmp_path)))
