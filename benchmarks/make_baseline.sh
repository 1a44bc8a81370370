#!/usr/bin/env bash
# Frozen copies of the package at a git revision, for `bench_solvers.py --baseline DIR`:
# DIR/neuralode_base and DIR/neuralode_base2 (identical; their difference is the noise of a run).
# Usage: benchmarks/make_baseline.sh REV DIR
set -euo pipefail
rev=${1:?git revision}
dir=${2:?output folder}
mkdir -p "$dir"
for name in neuralode_base neuralode_base2; do
    rm -rf "${dir:?}/$name" "$dir/src"
    git archive "$rev" src/neuralode | tar -x -C "$dir"
    mv "$dir/src/neuralode" "$dir/$name"
    rmdir "$dir/src"
    grep -rl neuralode "$dir/$name" --include='*.py' | xargs sed -i \
        -e "s/\bneuralode\./$name./g" -e "s/from neuralode import/from $name import/g" \
        -e "s/^import neuralode$/import $name as neuralode/"
done
echo "baseline of $rev in $dir"
