"""The trainer's promises, checked on the spiral (the cheapest experiment): run folders are never
overwritten by accident, resume is exact and refuses changed options, signals save, divergence is an
error, corrupt checkpoints name their path, and the records say what produced a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _cli import usage_error as _usage_error
from neuralode.cli import main
from neuralode.experiments._config import UsageError
from neuralode.experiments._trainer import RunFolder, read_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "--data-size",
    "120",
    "--hidden",
    "8",
    "--rtol",
    "1e-4",
    "--atol",
    "1e-6",
    "--eval-every",
    "2",
    "--no-plots",
]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NEURALODE_QUIET", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _spiral(out, *extra):
    return main(["train", "spiral", *TINY, "--out", str(out), *extra])


def _model(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["model"]


def test_rerun_is_refused_resume_and_overwrite_are_explicit(tmp_path, capsys):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    before = (out / "config.json").read_text(), (out / "metrics.jsonl").read_text()
    err = _usage_error(capsys, "train", "spiral", *TINY, "--iters", "2", "--out", str(out))
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert ((out / "config.json").read_text(), (out / "metrics.jsonl").read_text()) == before
    assert _spiral(out, "--iters", "4", "--resume") == 0
    assert [json.loads(r)["iter"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2, 4]
    launches = json.loads((out / "run.json").read_text())["launches"]
    assert [x["resumed_from_iteration"] for x in launches] == [None, 2]
    assert _spiral(out, "--iters", "2", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["iters"] == 2
    assert len(json.loads((out / "run.json").read_text())["launches"]) == 1
    err = _usage_error(capsys, "train", "spiral", "--out", str(out), "--resume", "--overwrite")
    assert "exclude each other" in err


def test_resume_without_checkpoint_and_overwrite_of_a_foreign_folder_are_errors(tmp_path, capsys):
    err = _usage_error(capsys, "train", "spiral", "--out", str(tmp_path / "none"), "--resume")
    assert "no checkpoint.pt in" in err and not (tmp_path / "none").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    err = _usage_error(capsys, "train", "spiral", *TINY, "--out", str(mine), "--overwrite")
    assert "does not look like a run folder" in err and (mine / "thesis.tex").read_text() == "precious"


def test_changed_options_are_refused_before_any_file_is_touched(tmp_path, capsys):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = _usage_error(capsys, "train", "spiral", "--out", str(out), "--resume", "--lr", "0.05")
    assert "--lr 0.05 differs from the resumed run's lr=0.001" in err and "--iters" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_lock_keeps_a_second_run_out(tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunFolder(out).open(fresh=True, overwrite=False)
    try:
        err = _usage_error(capsys, "train", "spiral", *TINY, "--iters", "1", "--out", str(out), "--overwrite")
        assert f"another run (pid {os.getpid()}) is writing to" in err
    finally:
        holder.close()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_user_mistakes_make_no_folder(tmp_path, capsys):
    for argv in (
        ["--iters", "0"],
        ["--iters", "-5"],
        ["--lr", "0"],
        ["--eval-every", "0"],
        ["--device", "tpu"],
    ):
        err = _usage_error(capsys, "train", "spiral", *argv, "--out", str(tmp_path / "never"))
        assert err.count("error:") == 1
        assert not (tmp_path / "never").exists()


def test_config_file_relaunches_a_run_and_print_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2", "--seed", "3") == 0
    capsys.readouterr()
    assert main(["train", "spiral", "--config", str(out / "config.json"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["hidden"] == 8 and printed["experiment"] == "spiral"
    again = tmp_path / "again"
    assert main(["train", "spiral", "--config", str(out / "config.json"), "--out", str(again)]) == 0
    for k, v in _model(out).items():
        assert torch.equal(v, _model(again)[k]), k
    bad = tmp_path / "bad.json"
    bad.write_text('{"iters": 2, "learning_rate": 1}')
    assert "unknown fields ['learning_rate']" in _usage_error(capsys, "train", "spiral", "--config", str(bad))


def test_divergence_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, capsys):
    # at lr 1e3 the second iteration's solve takes ever smaller steps; a budget of 50 steps catches it
    out = tmp_path / "run"
    argv = ["train", "spiral", *TINY, "--iters", "6", "--lr", "1e3", "--max-steps", "50", "--out", str(out)]
    code = main([*argv, "--eval-every", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged at iteration" in err and "Lower --lr (now 1000)" in err
    assert "Traceback" not in err and "the last good checkpoint is kept" in err
    good = read_checkpoint(out / "checkpoint.pt")
    assert 0 <= good["step"] < 6 and all(v.isfinite().all() for v in good["model"].values())
    assert json.loads((out / "run.json").read_text())["launches"][-1]["status"] == "diverged"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_corrupt_checkpoint_names_its_path(tmp_path, capsys, content):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    (out / "checkpoint.pt").write_bytes(content)
    err = _usage_error(capsys, "train", "spiral", "--out", str(out), "--resume")
    assert str(out / "checkpoint.pt") in err and ("empty" in err or "cannot be read" in err)
    with pytest.raises(UsageError, match="checkpoint"):
        read_checkpoint(out / "checkpoint.pt")


def test_stale_tmp_files_are_removed(tmp_path):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"half")
    assert _spiral(out, "--iters", "4", "--resume") == 0
    assert not list(out.glob("*.tmp"))


def test_torchrun_restart_resumes_automatically(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _spiral(out, "--iters", "4") == 0  # no --resume: the relaunched job continues
    assert json.loads((out / "run.json").read_text())["launches"][-1]["resumed_from_iteration"] == 2


def _cli_env():
    return {**os.environ, "PYTHONPATH": str(SRC), "NEURALODE_QUIET": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_and_resume_is_bit_identical(tmp_path, signum):
    opts = ["train", "spiral", *TINY, "--iters", "60", "--eval-every", "1000"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cmd = [sys.executable, "-m", "neuralode", *opts, "--out", str(split)]
    proc = subprocess.Popen(cmd, env=_cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (split / "checkpoint.pt").exists() and time.monotonic() < deadline:  # the step-0 checkpoint
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "Resume with: neuralode train spiral --out" in err
    step = torch.load(split / "checkpoint.pt", weights_only=True)["step"]
    assert 0 <= step < 60
    status = json.loads((split / "run.json").read_text())["launches"][-1]["status"]
    assert status == f"interrupted by {signal.Signals(signum).name}"
    assert main([*opts, "--out", str(split), "--resume"]) == 0
    assert main([*opts, "--out", str(straight)]) == 0
    a, b = _model(straight), _model(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, split))
    assert ma["final_loss"] == mb["final_loss"] and ma["nfe_forward"] == mb["nfe_forward"]


def test_tensorboard_without_the_package_is_a_usage_error(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    err = _usage_error(capsys, "train", "spiral", *TINY, "--out", str(tmp_path / "never"), "--tensorboard")
    assert "--tensorboard needs the tensorboard package" in err and not (tmp_path / "never").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tensorboard_scalars_read_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _spiral(out, "--iters", "4", "--tensorboard") == 0
    assert _spiral(out, "--iters", "6", "--resume", "--tensorboard") == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/nfe_forward", "eval/eval_l1"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in acc.Scalars("eval/eval_l1")}
    assert logged == pytest.approx({r["iter"]: r["eval_l1"] for r in rows})


def test_a_signal_outside_the_loop_stops_at_once_naming_the_last_checkpoint():
    from neuralode.experiments._trainer import Interrupted, StopSignal

    with StopSignal() as stop:
        stop.saved = 7  # e.g. during the final test, after the last checkpoint
        with pytest.raises(Interrupted, match="stopped by SIGTERM at iteration 7") as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert exc.value.step == 7
        stop.signum, stop.saved = 0, None
        with pytest.raises(Interrupted, match="before its first checkpoint"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop.signum, stop.defer = 0, True  # inside the loop: only noted, the trainer stops after the step
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_max_steps_may_be_raised_on_resume(tmp_path):
    out = tmp_path / "run"
    assert _spiral(out, "--iters", "2") == 0
    assert _spiral(out, "--iters", "4", "--resume", "--max-steps", "5000") == 0
    assert read_checkpoint(out / "checkpoint.pt")["config"]["max_steps"] == 5000
    assert json.loads((out / "config.json").read_text())["max_steps"] == 5000


_TORCHRUN = Path(sys.executable).parent / "torchrun"
_DDP = {
    "spiral": ["--iters", "6", "--data-size", "120", "--hidden", "8", "--eval-every", "3"],
    "cnf": ["--iters", "4", "--eval-size", "200", "--batch-size", "64", "--field", "mlp", "--hidden", "8-8",
            "--eval-every", "2"],
    "latent": ["--iters", "4", "--n-spirals", "40", "--n-train", "32", "--eval-every", "2", "--obs", "10"],
}  # fmt: skip


@pytest.mark.slow  # three interpreters start per run: tens of seconds on a loaded machine
@pytest.mark.skipif(not _TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("name", ["spiral", "cnf", "latent"])
def test_torchrun_two_processes_train_what_one_process_trains(tmp_path, name):
    # each process takes its part of the same global batch; the gradients are averaged by sample count.
    # A fixed-step solver makes each part's solve the one of the whole batch: equal to float rounding
    # (the latent ODE's reparameterisation noise is cut from the whole batch's noise)
    argv = ["train", name, *_DDP[name], "--method", "rk4", "--no-plots"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "neuralode", *argv, "--out", str(one)], env=_cli_env(), check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([str(_TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "neuralode", *argv, "--out",
                    str(two)], env=_cli_env(), check=True, capture_output=True)  # fmt: skip
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a, b = _model(one), _model(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-6)
    assert read_checkpoint(two / "checkpoint.pt")["step"] == int(_DDP[name][1])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
