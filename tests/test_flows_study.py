"""The flow study script (benchmarks/study_flows.py) on a tiny budget: output structure and guards."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "study_flows.py"
_spec = importlib.util.spec_from_file_location("study_flows", _PATH)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fig5_core_writes_runs_summary_and_table(tmp_path):
    out = tmp_path / "fig5"
    argv = ["fig5", "--out", str(out), "--cells", "baseline,base_to_data_detached,scale_0.5", "--iters", "3",
            "--layers", "4", "--seeds", "0,1", "--n-test", "50", "--no-plots"]  # fmt: skip
    assert study.main(argv) == 0
    runs = _lines(out / "runs.jsonl")
    assert {(r["cell"], r["seed"]) for r in runs} == {
        (c, s) for c in ("baseline", "base_to_data_detached", "scale_0.5") for s in (0, 1)
    }
    assert all(math.isfinite(r["gap"]) and r["cpu_s"] >= 0 and r["curve"] for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    cell = summary["cells"]["base_to_data_detached"]
    assert cell["config"]["direction"] == "base_to_data" and cell["config"]["gradient"] == "detached"
    assert cell["gap"]["n"] == 2 and cell["seeds"] == [0, 1] and cell["config"]["layers"] == 4
    # the gap is invariant to the data's scale: both NLLs move by 2 log(scale)
    ref = summary["cells"]["scale_0.5"]["reference_nll"] - summary["cells"]["baseline"]["reference_nll"]
    assert ref == pytest.approx(2 * math.log(0.5), abs=1e-9)
    assert "base_to_data_detached" in (out / "table.md").read_text()
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "base_to_data_detached.pt", "baseline.pt", "scale_0.5.pt"
    ]  # fmt: skip
    # resume skips finished runs; an existing folder is refused without --resume/--overwrite
    assert study.main([*argv, "--resume"]) == 0
    assert len(_lines(out / "runs.jsonl")) == len(runs)
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    assert e.value.code == 2


def test_fig4_core_reads_out_nf_at_the_cnf_budget_and_cpu_time(tmp_path):
    out = tmp_path / "fig4"
    argv = ["fig4", "--out", str(out), "--targets", "U1", "--sizes", "2", "--cnf-iters", "2", "--nf-ratio", "4",
            "--seeds", "0", "--n-eval", "64", "--batch", "16", "--rtol", "1e-2", "--no-plots"]  # fmt: skip
    assert study.main(argv) == 0
    runs = {r["kind"]: r for r in _lines(out / "runs.jsonl")}
    assert runs["nf"]["iters"] == 8 and runs["cnf"]["iters"] == 2
    assert [ro[0] for ro in runs["nf"]["readouts"]] == study._readout_iters(2, 4)
    assert all(ro[1] > -0.5 for ro in runs["nf"]["readouts"])  # KL ≥ 0 up to Monte-Carlo error
    cell = json.loads((out / "summary.json").read_text())["cells"]["U1/2"]
    assert cell["nf_at_cnf_iters"]["n"] == 1 and cell["cnf"]["n"] == 1 and cell["cnf_nfe"]["mean"] > 0


def test_compute_matched_takes_the_last_readout_within_the_cpu_budget():
    run = {"readouts": [[10, 3.0, 0.5, 1.0], [20, 2.0, 1.0, 2.0], [40, 1.0, 2.0, 4.0]]}
    assert study.compute_matched(run, 1.5) == {"iters": 20, "kl": 2.0, "cpu_s": 1.0}
    assert study.compute_matched(run, 0.1) is None


def test_unknown_cell_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        study.main(["fig5", "--out", str(tmp_path / "x"), "--cells", "nope"])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
