"""``options={"compile": True}`` where users meet it: a model's training step, and a lambda per solve.

1. ODE-Net (``neuralode.models.odenet``, 64 channels, conv downsampling) on an MNIST-shaped random batch
   (128 × 1 × 28 × 28), dopri5 at rtol = atol = 1e-3: seconds per training iteration (forward, backward,
   SGD step), eager vs compiled, with backprop and with the adjoint; median of ``--repeats`` interleaved
   iterations after one warm-up iteration (whose wall time, the compilation, is reported).
2. ``odeint(lambda t, y: net(y), ...)`` with a new lambda every call (a training loop's habit), compiled:
   wall time per solve of the first call and of the next ones (each would trace and compile again if
   the compiled step were keyed on the function object).

    python benchmarks/bench_compiled_models.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import neuralode
from neuralode.models.odenet import build_model


def odenet_rows(repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    steps, first = {}, {}
    for name, opts in (("eager", None), ("compile", {"compile": True})):
        for grad in ("direct", "adjoint"):
            torch.manual_seed(0)
            model = build_model(
                "odenet", channels=64, downsampling="conv", method="dopri5", rtol=1e-3, atol=1e-3,
                options=opts, gradient=grad,
            )  # fmt: skip
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def step(model=model, opt=opt):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            w0 = time.perf_counter()
            step()
            first[name, grad] = time.perf_counter() - w0
            steps[name, grad] = step
    # Interleaved, the order rotating: the machine's speed drifts more between minutes than the gap.
    times: dict = {key: [] for key in steps}
    keys = list(steps)
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            w0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - w0)
    print("| ODE-Net training iteration | gradient | first call s | median s/iter | × vs eager |")
    print("|---|---|---|---|---|")
    for name, grad in keys:
        med = statistics.median(times[name, grad])
        ratio = statistics.median(times["eager", grad]) / med
        print(f"| {name} | {grad} | {first[name, grad]:.1f} | {med:.3f} | {ratio:.2f} |", flush=True)


def lambda_rows(solves: int) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    y0, t = torch.randn(8, 2), torch.tensor([0.0, 1.0])
    times = []
    with torch.no_grad():
        for _ in range(solves):
            w0 = time.perf_counter()
            neuralode.odeint(lambda t, y: net(y), y0, t, options={"compile": True})
            times.append(time.perf_counter() - w0)
    print(
        f"\nnew lambda per solve, compiled: first call {times[0]:.2f} s, then median "
        f"{statistics.median(times[1:]) * 1e3:.1f} ms per solve ({solves - 1} solves)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU\n")
    odenet_rows(args.repeats)
    lambda_rows(6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
