#!/usr/bin/env bash
# One-shot GPU check for a session that is lent a CUDA machine: the CUDA correctness tests, then the
# benchmark tables on the GPU, in about 6-8 minutes. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu_results
#
# Needs a Python with a CUDA build of torch (set PYTHON=...); torchdiffeq/torchode/torchdyn and pytest are
# used when installed, skipped otherwise. Each stage has its own timeout, so one slow stage cannot eat the
# others' time; every stage writes its output to $OUT as it goes.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="ignore::DeprecationWarning"

echo "== environment" | tee "$OUT/env.txt"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) 2>&1 | tee -a "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/env.txt"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA: nothing to check"; exit 1; }

echo "== CUDA tests (pytest -m gpu)"
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rs 2>&1 | tee "$OUT/tests_gpu.txt" | tail -15

echo "== neural-field table on the GPU (wall clock)"
timeout 200 $PY benchmarks/bench_solvers.py --device cuda --budget 3 --repeats 7 --no-spiral \
    --json "$OUT/solvers_cuda.json" --markdown "$OUT/solvers_cuda.md" 2>&1 | tee "$OUT/solvers_cuda.txt" | tail -30

echo "== per-sample vs joint (Van der Pol) on the GPU"
timeout 90 $PY benchmarks/bench_per_sample.py --device cuda --repeats 5 --json "$OUT/per_sample_cuda.json" \
    2>&1 | tee "$OUT/per_sample_cuda.txt" | tail -10

echo "== eager vs compiled vs CUDA graph"
timeout 180 $PY benchmarks/bench_compiled.py --device cuda --batches 64,1024 --repeats 10 \
    --json "$OUT/compiled_cuda.json" 2>&1 | tee "$OUT/compiled_cuda.txt" | tail -20
echo "== eager vs compiled adaptive step (options={'compile': True})"
timeout 100 $PY benchmarks/bench_compiled_adaptive.py --device cuda --rows "2-64-64-2 b=64 f32" --budget 3 \
    --json "$OUT/compiled_adaptive_cuda.json" 2>&1 | tee "$OUT/compiled_adaptive_cuda.txt" | tail -10
echo "== done; results in $OUT"
