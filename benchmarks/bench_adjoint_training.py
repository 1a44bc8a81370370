"""One training iteration (forward, loss, backward; no optimiser step) with each gradient method: direct
backprop, the adjoint's three sensitivities, checkpointing, and torchdiffeq's adjoint.

Problems (``--problem``):

- ``spiral``: the model and data of ``neuralode train spiral`` (``SpiralFunc``: 2-50-2 tanh on y³,
  float32; dopri5 at rtol 1e-7, atol 1e-9; batch 20 windows of 10 output times; L1 loss).
- ``mnist``: the ODE-Net classifier (64 channels, its ODE block on [0, 1] by dopri5 at rtol = atol =
  1e-3; cross-entropy), on a seeded batch of random 28×28 inputs (``--batch``, default 32) with random
  labels: no data set needed; the solver's work at the seeded initial weights is what is measured.

Weights at their seeded initialisation. The contenders run interleaved, ``--rounds`` times over the same
``--batches`` minibatches, at one thread; reported: median wall and process-CPU milliseconds per
iteration, the spread (max/min of the per-round CPU medians of direct backprop: the machine's noise),
forward/backward NFE of the first batch and the gradient's relative difference from direct backprop.

Usage::

    python benchmarks/bench_adjoint_training.py [--problem spiral|mnist] [--rounds 7] [--batches 5]

``adjoint_options={"compile": True}`` rows (the backward evaluation compiled, ``...compiled``) are
included unless ``--no-compile``; their first iteration (after ``torch._dynamo.reset()``) pays the
compilation, reported as ``first call wall s`` (wall time: Inductor compiles in worker processes; with
Inductor's on-disk cache as the machine has it, ``TORCHINDUCTOR_CACHE_DIR`` pointing at an empty folder
gives a cold compile), and is left out of the timed rounds like every row's warm-up.

Before/after a change of the library: ``--baseline DIR`` adds the neuralode rows of the packages
``neuralode_base`` (and, if present, ``neuralode_base2``, an identical second copy: its difference to the
first is the noise of the run) found in ``DIR``, timed interleaved with ``neuralode`` in the same process
(``benchmarks/make_baseline.sh REV DIR`` makes them); ``--only SUBSTR`` keeps the rows whose name contains
one of the comma-separated substrings (``direct`` is always kept: the ratios refer to it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time

import torch

import neuralode


class Counted(torch.nn.Module):
    def __init__(self, func):
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


def contenders(func: Counted, tol: dict, lib=neuralode, tag: str = "", compiled: bool = False) -> dict:
    """name -> solve(y0, t) returning the trajectory ``(len(t), *y0.shape)``; ``lib`` a copy of the
    package (``--baseline``): its rows only, named with ``tag`` in front; ``compiled``: with the rows of
    ``adjoint_options={"compile": True}``."""
    import torchdiffeq

    def node(**kw):
        m = lib.NeuralODE(func, **tol, **kw)
        return lambda y0, t: m(y0, t)

    semi = {"norm": "seminorm"}
    semi_c = {"norm": "seminorm", "compile": True}
    ours = {
        "direct": node(gradient="direct"),
        "adjoint backsolve, seminorm (NeuralODE default)": node(gradient="adjoint"),
        "adjoint backsolve, default norm (odeint_adjoint default)": lambda y0, t: lib.odeint_adjoint(
            func, y0, t, **tol
        ),
        "adjoint interpolating, seminorm": node(gradient="adjoint", sensitivity="interpolating"),
        "adjoint quadrature": node(gradient="adjoint", sensitivity="quadrature"),
        "adjoint interpolating, seminorm, adjoint_method=bosh3": lambda y0, t: lib.odeint_adjoint(
            func, y0, t, **tol, sensitivity="interpolating", adjoint_method="bosh3", adjoint_options=semi
        ),
        "checkpoint": node(gradient="checkpoint"),
    }
    if compiled:
        ours.update(
            {
                "adjoint backsolve, seminorm, compiled": node(gradient="adjoint", adjoint_options=semi_c),
                "adjoint interpolating, seminorm, compiled": node(
                    gradient="adjoint", sensitivity="interpolating", adjoint_options=semi_c
                ),
                "adjoint interpolating, seminorm, adjoint_method=bosh3, compiled": lambda y0, t: (
                    lib.odeint_adjoint(
                        func,
                        y0,
                        t,
                        **tol,
                        sensitivity="interpolating",
                        adjoint_method="bosh3",
                        adjoint_options=semi_c,
                    )
                ),
            }
        )
    if tag:
        return {f"{tag} {name}": solve for name, solve in ours.items()}
    return {
        **ours,
        "torchdiffeq adjoint, default norm": lambda y0, t: torchdiffeq.odeint_adjoint(func, y0, t, **tol),
        "torchdiffeq adjoint, seminorm": lambda y0, t: torchdiffeq.odeint_adjoint(
            func, y0, t, adjoint_options=semi, **tol
        ),
        "torchdiffeq direct": lambda y0, t: torchdiffeq.odeint(func, y0, t, **tol),
    }


def spiral_problem(n_batches: int, batch: int | None):
    from neuralode.experiments.spiral import SpiralConfig, SpiralFunc, _get_batch, make_spiral_data

    cfg = SpiralConfig() if batch is None else SpiralConfig(batch_size=batch)
    t_all, y_all = make_spiral_data(cfg.data_size, cfg.t_end)
    gen = torch.Generator().manual_seed(0)
    batches = [_get_batch(t_all, y_all, cfg, gen) for _ in range(n_batches)]
    torch.manual_seed(cfg.seed)
    func = Counted(SpiralFunc(cfg.hidden))

    def loss(solve, b):
        y0, t, y = b
        return (solve(y0, t) - y).abs().mean()

    return func, dict(rtol=cfg.rtol, atol=cfg.atol, method=cfg.method), batches, loss, list(func.parameters())


def mnist_problem(n_batches: int, batch: int | None):
    from neuralode.models.odenet import ODENet

    torch.manual_seed(0)
    model = ODENet(64)
    func = Counted(model.odefunc)
    gen = torch.Generator().manual_seed(1)
    n = 32 if batch is None else batch
    batches = [(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))]
    batches = batches + [
        (torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))
        for _ in range(n_batches - 1)
    ]
    t = torch.tensor([0.0, 1.0])

    def loss(solve, b):
        x, labels = b
        logits = model.head(solve(model.downsampling(x), t)[-1])
        return torch.nn.functional.cross_entropy(logits, labels)

    return func, dict(rtol=1e-3, atol=1e-3, method="dopri5"), batches, loss, list(model.parameters())


def eval_costs(func, params, y0: torch.Tensor, reps: int, rounds: int, compiled: bool) -> dict:
    """Median process-CPU microseconds of the pieces of one evaluation at ``y0`` (``--costs``): ``func``
    without a graph (an adjoint forward evaluation), with one (a direct-backprop forward evaluation, and
    the first half of a backward one), the vector-Jacobian product with respect to ``(y, θ)`` that
    completes a backward evaluation (the library's own call), and that product alone on a kept graph (a
    jump of ``"interpolating"``/``"quadrature"``), and with ``compiled`` the compiled backward evaluation
    (``adjoint_options={"compile": True}``: ``func`` and the product in one graph)."""
    from neuralode._gradients.adjoint import _vjp

    ps = tuple(params)
    t = torch.scalar_tensor(0.1)
    v = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0))

    def no_graph():
        with torch.no_grad():
            func(t, y0)

    def graph():
        with torch.enable_grad():
            func(t, y0.detach().requires_grad_(True))

    def backward_eval():
        with torch.enable_grad():
            y_ = y0.detach().requires_grad_(True)
            fy = func(t, y_)
        _vjp(fy, (y_, *ps), v)

    with torch.enable_grad():
        y_kept = y0.detach().requires_grad_(True)
        fy_kept = func(t, y_kept)

    def kept_vjp():
        _vjp(fy_kept, (y_kept, *ps), v, retain=True)

    pieces = {
        "func, no graph": no_graph,
        "func, with graph": graph,
        "func with graph + VJP (one backward evaluation)": backward_eval,
        "VJP alone, kept graph (a jump)": kept_vjp,
    }
    if compiled:
        from neuralode._gradients.compiled_eval import compiled_backward_eval, tracing_settings

        evaluate, _ = compiled_backward_eval(
            func, None, y0.shape, False, False, len(ps), {}, params=tuple(ps)
        )
        y_flat, v_flat = y0.reshape(-1), v.reshape(-1)

        def compiled_eval():
            with tracing_settings():
                evaluate(t, y_flat, v_flat, *ps)

        with torch.no_grad():
            compiled_eval()  # compiles
        pieces["compiled backward evaluation (adjoint_options['compile'])"] = compiled_eval
    out = {name: [] for name in pieces}
    with torch.no_grad():  # as in a backward pass
        for _ in range(rounds):
            for name, piece in pieces.items():
                c0 = time.process_time()
                for _ in range(reps):
                    piece()
                out[name].append(1e6 * (time.process_time() - c0) / reps)
    return {name: statistics.median(v) for name, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=("spiral", "mnist"), default="spiral")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 20 spiral, 32 mnist)")
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", default=None, help="folder holding neuralode_base (and neuralode_base2)")
    p.add_argument("--only", default=None, help="comma-separated substrings of the row names to keep")
    p.add_argument("--costs", action="store_true", help="spiral: also time the pieces of one evaluation")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled-backward rows")
    args = p.parse_args(argv)
    if args.costs and args.problem != "spiral":
        p.error("--costs times the spiral field only")
    torch.set_num_threads(1)
    make = spiral_problem if args.problem == "spiral" else mnist_problem
    func, tol, batches, loss_of, params = make(args.batches, args.batch)
    runs = contenders(func, tol, compiled=not args.no_compile)
    if args.baseline:
        sys.path.insert(0, args.baseline)
        for name in ("neuralode_base", "neuralode_base2"):
            try:
                lib = importlib.import_module(name)
            except ImportError:
                continue
            runs.update(contenders(func, tol, lib, f"[{name}]"))
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        runs = {n: s for n, s in runs.items() if n == "direct" or any(k in n for k in keys)}

    split = {name: ([], []) for name in runs}  # per-round medians of forward (with loss), backward CPU

    def iteration(solve, batch, times=None) -> tuple[int, int]:
        for q in params:
            q.grad = None
        func.calls = 0
        c0 = time.process_time()
        loss = loss_of(solve, batch)
        c1 = time.process_time()
        fwd = func.calls
        loss.backward()
        if times is not None:
            times[0].append(c1 - c0)
            times[1].append(time.process_time() - c1)
        return fwd, func.calls - fwd

    nfe, first = {}, {}  # also the warm-up; a compiled row's first iteration compiles (dynamo reset first)
    for name, solve in runs.items():
        if name.endswith("compiled"):
            torch._dynamo.reset()
        w0 = time.perf_counter()  # wall: Inductor compiles its C++ in worker processes
        nfe[name] = iteration(solve, batches[0])
        first[name] = time.perf_counter() - w0
    grads = {}
    for name, solve in runs.items():
        iteration(solve, batches[0])
        grads[name] = torch.cat([q.grad.reshape(-1) for q in params])
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, solve in runs.items():
            w, c, fb = [], [], ([], [])
            for batch in batches:
                w0, c0 = time.perf_counter(), time.process_time()
                iteration(solve, batch, fb)
                w.append(time.perf_counter() - w0)
                c.append(time.process_time() - c0)
            wall[name].append(statistics.median(w))
            cpu[name].append(statistics.median(c))
            split[name][0].append(statistics.median(fb[0]))
            split[name][1].append(statistics.median(fb[1]))
    ref = statistics.median(cpu["direct"])
    noise = max(cpu["direct"]) / min(cpu["direct"])
    g_ref = grads["direct"]
    rows = []
    print(f"{args.problem}: per-round CPU medians of direct backprop vary {noise:.2f}x (max/min)\n")
    print(
        "| gradient | wall ms | CPU ms | CPU vs direct | CPU ms fwd / bwd | NFE fwd | NFE bwd "
        "| grad rel. diff vs direct | first call wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        rel = float((grads[name] - g_ref).norm() / g_ref.norm())
        row = {
            "gradient": name,
            "wall_ms": 1e3 * statistics.median(wall[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "cpu_fwd_ms": 1e3 * statistics.median(split[name][0]),
            "cpu_bwd_ms": 1e3 * statistics.median(split[name][1]),
            "nfe_fwd": nfe[name][0],
            "nfe_bwd": nfe[name][1],
            "grad_rel_diff": rel,
            "first_call_wall_s": first[name],
        }
        rows.append(row)
        print(
            f"| {name} | {row['wall_ms']:.1f} | {row['cpu_ms']:.1f} | {row['cpu_ms'] / (1e3 * ref):.2f}x | "
            f"{row['cpu_fwd_ms']:.1f} / {row['cpu_bwd_ms']:.1f} | {row['nfe_fwd']} | {row['nfe_bwd']} | {rel:.1e} | {first[name]:.2f} |"
        )
    costs = None
    if args.costs:
        costs = eval_costs(func, params, batches[0][0], 200, args.rounds, not args.no_compile)
        print("\n| piece of one evaluation (CPU µs, median) | µs |\n|---|---:|")
        for name, us in costs.items():
            print(f"| {name} | {us:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            out = {"problem": args.problem, "noise": noise, "rows": rows, "costs": costs}
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
