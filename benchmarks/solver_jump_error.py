"""How far one teacher jump Ψ(z_{t_{n+k}}, t_{n+k}, t_n) of each ODE solver lands from the guided PF-ODE's solution, per
skipping step k: the error LCD's target inherits (Eq. 17), which the paper's Figure 3 reads off as "DDIM is worse than the
DPM solvers at k = 50".

The reference is the same jump made of k DDIM steps of one timestep each (the finest grid the teacher has). Data latents
of the built-in world, noised to t with one ε; the relative error is ‖Ψ − ref‖ / ‖ref − z_t‖ (the error as a fraction
of the jump's own length). Usage (CPU, about a minute):

    python benchmarks/solver_jump_error.py [--world DIR] [--samples 64] [--guidance-scale 2]
"""

from __future__ import annotations

import argparse

import torch

from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.solvers import get_solver, guided_jump
from latent_consistency.world.artifact import default_world_path, load_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset

SKIPS = (5, 10, 20, 50)
TIMESTEPS = (999, 759, 499, 259)
SOLVERS = ("ddim", "dpm", "dpm++")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", help="world folder (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    args = parser.parse_args()
    world = load_world(args.world or default_world_path(), torch.device("cpu"))
    model, teacher = world.model, world.model.guided_teacher()
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(args.samples)]
    x0 = model.codec.encode(torch.stack([it["image"] for it in items])).float()
    cond = model.prompts.encode([it["caption"] for it in items], torch.device("cpu"))
    uncond = model.prompts.uncond(torch.device("cpu")).expand(len(items), -1, -1)
    omega = omega_from_guidance_scale(args.guidance_scale)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ddim = get_solver("ddim")
    print(f"relative error of one jump t -> t - k against {'k one-timestep DDIM steps'}, g = {args.guidance_scale:g}, "
          f"{args.samples} world latents")
    print("| k | t | " + " | ".join(SOLVERS) + " |\n|---|---|" + "---|" * len(SOLVERS))
    for k in SKIPS:
        for t in TIMESTEPS:
            z = model.schedule.add_noise(x0, noise, torch.full((len(x0),), t))
            ref = z
            for now in range(t, t - k, -1):
                ref = guided_jump(ddim, teacher, ref, torch.tensor(now), torch.tensor(now - 1), cond, uncond, omega)
            length = (ref - z).flatten(1).norm(dim=1)
            errors = []
            for name in SOLVERS:
                jump = guided_jump(get_solver(name), teacher, z, torch.tensor(t), torch.tensor(t - k), cond, uncond, omega)
                errors.append(((jump - ref).flatten(1).norm(dim=1) / length).mean().item())
            print(f"| {k} | {t} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
