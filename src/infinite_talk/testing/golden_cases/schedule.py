"""Golden component `schedule`: the reference timestep list (see infinite_talk.sampling.schedules)."""

from __future__ import annotations

import torch

from infinite_talk.sampling.schedules import make_sampler, reference_timesteps


def run(case) -> dict[str, torch.Tensor]:
    steps, shift = int(case.meta["steps"]), float(case.meta["shift"])
    timesteps = reference_timesteps(steps, shift)
    sampler = make_sampler("euler", steps, shift)
    # the sampler must hand the model exactly the schedule's first `steps` entries
    if not torch.equal(sampler.timesteps, timesteps[:-1]):
        raise AssertionError("euler sampler timesteps differ from reference_timesteps")
    return {"timesteps": timesteps, "aux.dt": sampler.dt, "aux.sigmas": sampler.sigmas}
