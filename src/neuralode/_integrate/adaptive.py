"""The adaptive loop of every joint method (one step size for the whole state).

:func:`adaptive_loop` is the time stepping around a step, the same for every such method: the step
proposal (the last step clipped to ``t[-1]``, ``step_t``/``jump_t`` stops, the step limit), the
accept/reject test on the error ratio, the callbacks, the outputs (exact at a step's end, dense output
inside it), ``trace``, ``on_accept``, terminal events, the adjoint's ``jump`` hook, ``f`` as a one-sided
limit across a jump, the statistics, the step-size controller (with the step size kept while that keeps
an LU factorisation) and, with ``throw=False``, the ending with NaN outputs. What a method does within a
step is a :class:`StepStrategy`: explicit Runge-Kutta (``_integrate/joint.py``), ESDIRK with Newton
iterations (``_solvers/stiff.py``) and Rosenbrock-W (``_solvers/rosenbrock.py``).

Times and step sizes are host floats; each step synchronises with the device once, when the loop reads
the error ratio (a strategy may have synchronised already and hand over a float).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from neuralode._errors import SolverError
from neuralode._interpolation import step_outputs
from neuralode._stats import SolveStats
from neuralode._step_size import propose_step

__all__ = ["KEEP_H", "StepStrategy", "adaptive_loop", "before_jump", "finish"]

#: Keep ``h`` (and the LU factorisation built for it) when the controller proposes a factor in this range.
KEEP_H = (1.0, 1.2)


class StepStrategy(Protocol):
    """What a method does within one step of :func:`adaptive_loop`.

    ``k`` below is a step's stage data, whatever the method keeps of it (the explicit stages, the ESDIRK
    stages, the Rosenbrock transformed stages); the loop only passes it back to the strategy.
    """

    #: The last entry of ``k`` is ``f(t1, y1)`` (first same as last); else the loop evaluates it.
    fsal: bool
    #: Evaluations of ``f`` per try that the loop counts (those the strategy does not count itself).
    evals: int
    #: ``None``, or the host factor of a ratio that ``attempt`` returns up to ``|h|`` times it (the
    #: explicit loop's RMS shortcut): the ratio is then ``float(ratio) * |h| * rms_factor``.
    rms_factor: float | None
    #: ``None``, or whether keeping the step size keeps something (the LU factorisation) after an
    #: accepted step whose controller factor lies in :data:`KEEP_H`; the step size is then kept.
    keep_lu: Callable[[], bool] | None
    #: ``None``, or called after each accepted step with whether it ended on a ``jump_t``.
    accepted: Callable[[bool], None] | None
    #: ``None``, or ``aux_of(y)``: the ``aux`` of a state the strategy has not stepped to (see ``attempt``).
    aux_of: Callable[[torch.Tensor], Any] | None
    #: Only for an ``attempt`` that may fail (return ``None``): the factor of ``h`` for the next try, and
    #: the message of the ``"underflow"`` error when a try at the minimum step size fails.
    retry_factor: float
    attempt_failure: str

    def attempt(
        self, f: Callable, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, aux
    ) -> tuple | None:
        """One try of the step from ``(t, y)`` (``f0 = f(t, y)``) of signed size ``h`` with the vector
        field ``f`` (one-sided before a jump the step ends on): ``(y1, ratio, k, aux1)`` with ``ratio``
        the error ratio (a float, or a 0-d tensor the loop fetches). ``aux1``: anything the strategy
        derived from ``y1`` that the next step may reuse; the loop hands it back as ``aux`` with the
        state ``y1`` (for the start, and for a state set by ``jump``: ``aux_of(y)``, or ``None``).
        ``None`` for the whole result: the try failed before an error estimate (a Newton iteration that
        did not converge); the loop rejects it and tries ``h`` times ``retry_factor`` (or stops with
        ``attempt_failure`` at the minimum step size)."""
        ...

    def limit_error(
        self, t: float, h: float, n_steps: int, max_num_steps: int, failed: tuple | None
    ) -> SolverError | None:
        """The error that ends the solve before a step that does not move ``t``, exceeds
        ``max_num_steps`` or is NaN/inf (``None``: go on). ``failed``: ``(t, h, k)`` of the last try when
        its error ratio was NaN/inf, else ``None``."""
        ...

    def nonfinite(
        self, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, n_steps: int
    ) -> SolverError | None:
        """After a try with a NaN/inf error ratio: the error when no smaller step can help (a non-finite
        state or ``f0``), else ``None`` (the try is rejected and ``h`` shrinks)."""
        ...

    def stages(self, k, f1: torch.Tensor | None) -> Any:
        """The accepted step's stage data for ``on_accept`` and events (``f1 = f(t1, y1)``)."""
        ...

    def dense(
        self, t: float, h: float, y: torch.Tensor, k, f1, thetas: Sequence[float]
    ) -> list[torch.Tensor]:
        """The accepted step's dense output at ``t + θh`` for each θ in (0, 1)."""
        ...


def adaptive_loop(
    step: StepStrategy,
    problem,
    stats: SolveStats,
    y0: torch.Tensor,
    f0: torch.Tensor,
    h0: float,
    *,
    trace: list | None = None,
    callbacks=None,
    event=None,
    jump=None,
    on_accept=None,
) -> list[torch.Tensor]:
    """Adaptive solve of a :class:`~neuralode._problem.Problem` with ``step``: its ``f``, output times
    ``t_out = problem.t`` (monotonic; ``t_out[0]`` is the start, where ``y0`` is given and
    ``f0 = f(t_out[0], y0)``), controller, step limits, stops and ``throw``, from the step size ``h0``;
    returns the states at ``t_out``.

    Output times never shorten a step: values between steps come from the dense output. Only the last
    step is clipped to end exactly at ``t_out[-1]``. ``trace`` (if given) receives ``(t, h)`` of every
    accepted step, which is all it takes to replay the solve (checkpointing). ``callbacks``:
    ``.step/.accept/.reject(t, y, h)`` (see ``_callbacks.py``). ``on_accept(t, h, y, stages)`` sees every
    accepted step (its start, signed size, start state and ``step.stages``).

    Stops (``problem.stops()``, options ``step_t``/``jump_t``): a step that would cross one is shortened
    to end on it; a step onto a jump is tried with ``f`` as the
    one-sided limit before it, and after it ``f`` is re-evaluated as the one-sided limit past it.
    ``jump(j, y) -> (y, f(t_j, y))`` (the adjoint's hook): the inner output times become stops, and at
    each the state is replaced by what ``jump`` returns, inside the one solve.
    ``event`` (terminal events, see ``_events.py``; strategies whose ratio is a tensor):
    ``event.crossed(t1, y1)`` returns a 0-d tensor fetched in the same synchronisation as the error ratio;
    on an accepted step where it is non-zero the loop calls ``event.found(t, h, y, stages, t1, y1)`` and
    stops. ``t_out[-1]`` may then be ±inf.

    A failure raises :class:`SolverError`; with ``throw=False`` the solve returns what it reached, NaN
    after it, with ``stats.status`` and ``stats.t_reached`` saying so.
    """
    s = problem.settings
    f, t_out, stops, controller = problem.f, problem.t, problem.stops(), s.controller
    min_step, max_step, max_num_steps, throw = s.min_step, s.max_step, s.max_num_steps, s.throw
    t_end = t_out[-1]
    direction = 1.0 if t_end > t_out[0] else -1.0
    n_out = len(t_out)
    outputs = [y0]
    i_out = 1
    t, y = t_out[0], y0
    h = min(abs(h0), max_step)
    prev_ratio = 1.0
    n_steps = 0
    i_stop = 0
    failed = None  # (t, h, k) of the last try when its error ratio was not finite
    if jump is not None:  # the output times between the ends become stops (merged with the user's)
        merged = dict.fromkeys(t_out[1:-1], False)
        for ts, is_jump in stops:
            merged[ts] = merged.get(ts, False) or is_jump
        stops = sorted(merged.items(), key=lambda p: direction * p[0])
    while i_stop < len(stops) and direction * (stops[i_stop][0] - t) <= 0:
        i_stop += 1
    attempt, after_accept, keep_lu, rms_host = step.attempt, step.accepted, step.keep_lu, step.rms_factor
    fsal, evals = step.fsal, step.evals
    aux_of = step.aux_of
    aux = None if aux_of is None else aux_of(y0)  # the strategy's data on the state y (see attempt)
    isfinite = math.isfinite
    # The loop's own counts, added to stats once (the strategies and the dense output add theirs).
    n_evals = n_accepted = n_rejected = 0
    last_step = None
    error = None  # the SolverError that ended the solve (throw=False)
    try:
        while i_out < n_out:
            h_signed, last, stop = propose_step(t, h, t_end, direction, stops, i_stop, min_step)
            if t + h_signed == t or n_steps >= max_num_steps or h_signed - h_signed != 0.0:  # (last: NaN/inf)
                error = step.limit_error(t, h_signed, n_steps, max_num_steps, failed)
                if error is not None:
                    if throw:
                        raise error
                    break
            if callbacks is not None:
                callbacks.step(t, y, h_signed)
            h_abs = abs(h_signed)
            # A step onto a jump evaluates its end-time stages as the one-sided limit before the jump.
            onto_jump = stop is not None and stop[1]
            n_evals += evals
            n_steps += 1
            tried = attempt(before_jump(f, stop[0], direction) if onto_jump else f, t, h_signed, y, f0, aux)
            if tried is None:  # no error estimate: rejected, retried smaller
                if h_abs <= min_step:
                    error = SolverError(
                        "underflow", step.attempt_failure, t=t, step_size=h_signed, n_steps=n_steps
                    )
                    if throw:
                        raise error
                    break
                n_rejected += 1
                if callbacks is not None:
                    callbacks.reject(t, y, h_signed)
                h = h_abs * step.retry_factor
                continue
            y1, ratio_t, k, aux1 = tried
            if event is None:
                ratio = float(ratio_t)  # the one sync per step
            else:  # the event's sign check rides on the same sync
                t1_try = stop[0] if stop is not None else t + h_signed
                pair = torch.stack([ratio_t.to(torch.float64), event.crossed(t1_try, y1).to(torch.float64)])
                ratio, crossed = pair.tolist()
            if rms_host is not None:
                ratio = ratio * h_abs * rms_host
            accepted = ratio <= 1.0 or h_abs <= min_step
            if not isfinite(ratio):
                accepted = False
                error = step.nonfinite(t, h_signed, y, f0, n_steps)
                if error is not None:
                    if throw:
                        raise error
                    n_rejected += 1
                    break
                failed = (t, h_signed, k)
            else:
                failed = None
            if accepted:
                t1 = t_end if last else (stop[0] if stop is not None else t + h_signed)
                j_jump = i_out if jump is not None and i_out < n_out - 1 and t_out[i_out] == t1 else None
                if j_jump is not None and not fsal and on_accept is None:
                    f1 = None  # replaced by the jump's own evaluation
                elif onto_jump:
                    f1 = f(t1, y1, perturb=int(direction))  # one-sided limit past the jump
                    n_evals += 1
                elif fsal:
                    f1 = k[-1]
                else:
                    f1 = f(t1, y1)
                    n_evals += 1
                if stop is not None:
                    i_stop += 1
                if callbacks is not None:
                    callbacks.accept(t, y, h_signed)
                if trace is not None:
                    trace.append((t, h_signed))
                if on_accept is not None:
                    on_accept(t, h_signed, y, step.stages(k, f1))
                # Outputs inside (t, t1]: exact at t1, dense output strictly inside.
                if direction * (t_out[i_out] - t1) <= 0:  # (the common step reaches no output)
                    inner, i_out, at_end = step_outputs(t_out, i_out, t, h_signed, t1, direction)
                    if inner:
                        outputs.extend(step.dense(t, h_signed, y, k, f1, inner))
                    if at_end:
                        outputs.append(y1)
                        i_out += 1
                stop_now = event is not None and bool(crossed)
                if stop_now:
                    event.found(t, h_signed, y, step.stages(k, f1), t1, y1)
                if j_jump is not None:
                    y1, f1 = jump(j_jump, y1)
                    aux1 = None if aux_of is None else aux_of(y1)
                if after_accept is not None:
                    after_accept(onto_jump)
                t, y, f0, aux = t1, y1, f1, aux1
                n_accepted += 1
                last_step = h_abs
                if stop_now:
                    break
            else:
                n_rejected += 1
                if callbacks is not None:
                    callbacks.reject(t, y, h_signed)
            factor = controller.factor(ratio, prev_ratio, accepted)
            if accepted:  # the PI controller's memory: the last accepted ratio before this step's
                prev_ratio = ratio
                if keep_lu is not None and KEEP_H[0] <= factor <= KEEP_H[1] and keep_lu():
                    factor = 1.0  # keep the step size, and with it the LU factorisation
            h = min(h_abs * factor, max_step)
    finally:
        stats.nfe += n_evals
        stats.n_steps += n_steps
        stats.n_accepted += n_accepted
        stats.n_rejected += n_rejected
        if last_step is not None:
            stats.last_step = last_step
    finish(stats, error, t, outputs, n_out, y0)
    if error is not None and event is not None:
        event.stopped(t, y)
    return outputs


def finish(stats: SolveStats, error: SolverError | None, t_reached: float, outputs: list, n_out: int, like):
    """Record how a joint solve ended in ``stats``; with a failure (``throw=False``) the outputs it never
    reached are NaN (constants, outside the autograd graph)."""
    stats.status = "success" if error is None else error.reason
    stats.t_reached = t_reached
    if len(outputs) < n_out:
        nan = torch.full_like(like, math.nan)
        outputs.extend([nan] * (n_out - len(outputs)))


def before_jump(f: Callable, t_jump: float, direction: float) -> Callable:
    """``f`` with evaluations at ``t_jump`` (to rounding) moved one ulp back, before the jump."""
    slack = 4 * math.ulp(max(1.0, abs(t_jump)))

    def fb(t: float, y: torch.Tensor) -> torch.Tensor:
        if abs(t - t_jump) <= slack:
            return f(t_jump, y, perturb=-int(direction))
        return f(t, y)

    return fb
