"""The one exception class a solve raises when it cannot finish."""

from __future__ import annotations

__all__ = ["SolverError"]


class SolverError(RuntimeError):
    """A solve could not finish: non-finite values, step-size underflow, too many steps, or no event.

    Attributes:
        reason: ``"nonfinite"``, ``"underflow"``, ``"max_num_steps"``, or ``"no_event"`` (an event search
            that used up its step budget before the event function crossed zero).
        t: time reached (float), ``step_size``: the last attempted step, ``n_steps``: attempted steps.
    """

    def __init__(self, reason: str, message: str, *, t: float, step_size: float, n_steps: int):
        hint = {
            "nonfinite": "the dynamics produced NaN/inf; check func for overflow, lower the learning rate, "
            "or tighten rtol/atol",
            "underflow": "the problem may be stiff or have a singularity here; loosen rtol/atol, set "
            "options['min_step'], or try an implicit method",
            "max_num_steps": "raise options['max_num_steps'], loosen rtol/atol, or shorten the interval",
            "no_event": "check event_fn's sign at t0 and along the solution (the event is a change of sign), "
            "return torch.zeros_like(t) past a terminal time to bound the search, or raise "
            "options['max_num_steps'] to search further",
        }[reason]
        super().__init__(f"{message} at t={t:.6g} (step size {step_size:.3g}, after {n_steps} steps): {hint}")
        self.reason, self.t, self.step_size, self.n_steps = reason, t, step_size, n_steps


def step_limit_error(t: float, h_signed: float, n_steps: int, max_num_steps: int) -> SolverError | None:
    """The error that ends an adaptive loop before its next step: the step no longer moves ``t``
    (``"underflow"``) or the step budget is spent (``"max_num_steps"``); ``None`` when it may go on."""
    if t + h_signed == t:
        return SolverError("underflow", "step size underflow", t=t, step_size=h_signed, n_steps=n_steps)
    if n_steps >= max_num_steps:
        return SolverError(
            "max_num_steps",
            f"max_num_steps={max_num_steps} exceeded",
            t=t,
            step_size=h_signed,
            n_steps=n_steps,
        )
    return None
