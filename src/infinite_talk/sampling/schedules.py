"""Timestep schedules and solvers of the sampling loop.

`euler` is the reference sampler (docs/REFERENCE.md §3.4): `linspace(1000, 1, steps)` + [0] in float32, each shifted
by `t' = 1000·s·σ/(1+(s−1)·σ)` (σ = t/1000), and the update `x ← x − v·(t'_i − t'_{i+1})/1000`.

`unipc` and `dpm++` are the diffusers flow-matching multistep solvers (flow prediction, flow sigmas, same shift).
`distill4` is the fixed 4-step list `[1000, 750, 500, 250]` warped with shift, then Euler to 0 (docs/OPTIONS.md §3).

A `Sampler` is stateful for the multistep solvers: make a fresh one (or call `reset()`) for every chunk, and call
`step(pred, i, latent)` for i = 0, 1, …, len(timesteps)−1 in order. Exactly `len(sampler.timesteps)` model
evaluations (per guidance pass) are made per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinite_talk.errors import OptionError

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULER_NAMES = ("euler", "unipc", "dpm++", "distill4")
DISTILL4_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp timesteps on the 0..1000 scale: σ = t/1000 → 1000·s·σ/(1+(s−1)·σ), computed in float32 (0 stays 0)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    sigma = t / NUM_TRAIN_TIMESTEPS
    warped = shift * sigma / (1 + (shift - 1) * sigma)
    return warped * NUM_TRAIN_TIMESTEPS


def reference_timesteps(steps: int, shift: float) -> torch.Tensor:
    """The reference schedule: float32 `linspace(1000, 1, steps)` + [0], shifted → [steps+1] (0..1000 scale).

    >>> reference_timesteps(4, 5.0).tolist()
    [1000.0, 909.21484375, 714.8972778320312, 4.9800801277160645, 0.0]
    """
    _check_steps_shift(steps, shift)
    # linspace evaluated in float64 and rounded once to float32 (bit-identical to the reference's float32 list;
    # torch's float32 linspace differs by 1 ulp on some entries).
    base = torch.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=torch.float64).to(torch.float32)
    base = torch.cat([base, torch.zeros(1)])
    return shift_timesteps(base, shift)


def _check_steps_shift(steps, shift) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OptionError(f"option 'steps' must be a whole number of at least 1, got {steps!r}", option="steps",
                          value=steps)
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise OptionError(f"option 'shift' must be a number above 0 (default 7 at 480p, 11 at 720p), got {shift!r}",
                          option="shift", value=shift)


@dataclass(frozen=True)
class SamplerPlan:
    """What the sampler will do, for the plan display and the output record."""

    name: str
    requested_steps: int
    steps: int  # model evaluations per guidance pass per chunk, exactly
    shift: float
    fixed: bool  # the timestep list does not follow `steps` (distill4)
    sigmas: tuple[float, ...]  # σ of every model call, plus the final σ (0)
    solver: str

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "requested_steps": self.requested_steps,
            "steps": self.steps,
            "shift": self.shift,
            "fixed": self.fixed,
            "sigmas": [round(s, 6) for s in self.sigmas],
            "solver": self.solver,
        }


class Sampler:
    """A timestep list (`timesteps`, the t given to the model, 0..1000) and an update rule (`step`)."""

    name: str = ""
    fixed: bool = False
    solver: str = ""

    def __init__(self, steps: int, shift: float):
        self.requested_steps = steps
        self.shift = float(shift)
        self.timesteps: torch.Tensor = torch.empty(0)
        self.sigmas: torch.Tensor = torch.empty(0)  # len(timesteps)+1, ends with 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def reset(self) -> None:
        """Forget solver history (call at the start of every chunk)."""

    def step(self, pred: torch.Tensor, t_index: int, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> SamplerPlan:
        return SamplerPlan(
            name=self.name,
            requested_steps=self.requested_steps,
            steps=self.num_steps,
            shift=self.shift,
            fixed=self.fixed,
            sigmas=tuple(float(s) for s in self.sigmas),
            solver=self.solver,
        )

    def _check_index(self, t_index: int) -> None:
        if not 0 <= t_index < self.num_steps:
            raise IndexError(f"step index {t_index} outside 0..{self.num_steps - 1}")


class EulerSampler(Sampler):
    """Reference flow-matching Euler on an explicit timestep list ending in 0."""

    name = "euler"
    solver = "flow-matching Euler (reference)"

    def __init__(self, steps: int, shift: float, schedule: torch.Tensor | None = None):
        super().__init__(steps, shift)
        full = reference_timesteps(steps, shift) if schedule is None else schedule
        self._full = full.to(torch.float32)
        self.timesteps = self._full[:-1]
        self.sigmas = self._full / NUM_TRAIN_TIMESTEPS
        self.dt = (self._full[:-1] - self._full[1:]) / NUM_TRAIN_TIMESTEPS  # float32, as the reference

    def step(self, pred: torch.Tensor, t_index: int, latent: torch.Tensor) -> torch.Tensor:
        self._check_index(t_index)
        return latent - pred * self.dt[t_index].to(pred.dtype)


class Distill4Sampler(EulerSampler):
    """Fixed list [1000, 750, 500, 250] warped with the shift, Euler to 0; always 4 model calls."""

    name = "distill4"
    fixed = True
    solver = "flow-matching Euler on the fixed distill list"

    def __init__(self, steps: int, shift: float):
        _check_steps_shift(steps, shift)
        schedule = shift_timesteps(torch.tensor([*DISTILL4_TIMESTEPS, 0.0]), shift)
        super().__init__(steps, shift, schedule=schedule)


class DiffusersFlowSampler(Sampler):
    """A diffusers multistep scheduler in flow-prediction mode with flow sigmas and the given shift."""

    def __init__(self, steps: int, shift: float, scheduler_cls, solver: str, **extra):
        _check_steps_shift(steps, shift)
        super().__init__(steps, shift)
        self.solver = solver
        self._scheduler = scheduler_cls(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=self.shift,
            **extra,
        )
        self.reset()
        self.sigmas = self._scheduler.sigmas.to(torch.float32).clone()
        # The model gets the continuous σ·1000 (the scheduler's own integer timesteps are only for its bookkeeping).
        self.timesteps = self.sigmas[:-1] * NUM_TRAIN_TIMESTEPS
        if self.num_steps != steps:
            raise OptionError(f"scheduler '{self.name}' produced {self.num_steps} steps instead of {steps}")
        self._next = 0

    def reset(self) -> None:
        self._scheduler.set_timesteps(self.requested_steps)
        self._next = 0

    def step(self, pred: torch.Tensor, t_index: int, latent: torch.Tensor) -> torch.Tensor:
        self._check_index(t_index)
        if t_index != self._next:
            raise RuntimeError(f"{self.name}: steps must run in order (expected {self._next}, got {t_index}); "
                               "call reset() at the start of every chunk")
        t = self._scheduler.timesteps[t_index]
        out = self._scheduler.step(pred, t, latent, return_dict=False)[0]
        self._next += 1
        return out.to(latent.dtype)


class UniPCSampler(DiffusersFlowSampler):
    name = "unipc"

    def __init__(self, steps: int, shift: float):
        from diffusers import UniPCMultistepScheduler

        super().__init__(steps, shift, UniPCMultistepScheduler, "diffusers UniPCMultistepScheduler (flow, bh2)")


class DPMPPSampler(DiffusersFlowSampler):
    name = "dpm++"

    def __init__(self, steps: int, shift: float):
        from diffusers import DPMSolverMultistepScheduler

        super().__init__(steps, shift, DPMSolverMultistepScheduler,
                         "diffusers DPMSolverMultistepScheduler (flow, dpmsolver++ order 2)",
                         algorithm_type="dpmsolver++", solver_order=2)


_SAMPLERS = {"euler": EulerSampler, "unipc": UniPCSampler, "dpm++": DPMPPSampler, "distill4": Distill4Sampler}


def make_sampler(name: str, steps: int, shift: float) -> Sampler:
    """A fresh sampler for one chunk. `name` is one of SCHEDULER_NAMES."""
    cls = _SAMPLERS.get(name)
    if cls is None:
        raise OptionError(f"option 'scheduler': unknown value {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}",
                          option="scheduler", value=name)
    _check_steps_shift(steps, shift)
    return cls(steps, shift)


def describe(name: str, steps: int, shift: float) -> SamplerPlan:
    """The plan of a scheduler without running it."""
    return make_sampler(name, steps, shift).describe()
