"""The two model contracts every solver, sampler and loss is written against.

A *network* is any callable `net(z, t, cond, timestep_cond=None) -> output` whose output is an ε-, v- or
x0-prediction (`UNetNetwork` adapts a diffusers UNet; the analytic test models implement it directly).

- `GuidedTeacher` turns a network into the guided denoiser of Eq. 12 of Luo et al. 2023:
  ε̃ = (1+ω)·ε(z, c, t) - ω·ε(z, ∅, t), cond and uncond in one batch.
- `ConsistencyModel` turns a student network into the consistency function of Eq. 9:
  f(z, ω, c, t) = c_skip(t)·z + c_out(t)·x̂0(z, ω, c, t), with ω fed through `timestep_cond`.
"""

from __future__ import annotations

import torch

from latent_consistency.parameterization import (
    SIGMA_DATA,
    TIMESTEP_SCALING,
    check_prediction_type,
    consistency_output,
    guidance_embedding,
    x0_and_eps,
)
from latent_consistency.schedule import NoiseSchedule, append_dims


class UNetNetwork:
    """Adapts a diffusers `UNet2DConditionModel` to the network contract."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, z, t, cond, timestep_cond=None):
        # Integer timesteps go in as integers (as diffusers pipelines pass them), real ones as float32.
        t = t if not torch.is_floating_point(t) else t.float()
        return self.unet(z, t, encoder_hidden_states=cond, timestep_cond=timestep_cond, return_dict=False)[0]


def _batch_t(t, z: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=z.device)
    return t.expand(z.shape[0]) if t.ndim == 0 else t


def guidance_repeats(omega, rows: int) -> int:
    """R when `omega` holds R guidance values for each of `rows` rows (copy-major), else 1."""
    omega = torch.as_tensor(omega)
    if omega.ndim == 0 or omega.numel() == rows:
        return 1
    if omega.numel() % rows:
        raise ValueError(f"{omega.numel()} guidance values for {rows} rows")
    return omega.numel() // rows


def tile(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """`repeats` copies of the batch x, one after the other (x itself for 1)."""
    return x if repeats == 1 else x.repeat(repeats, *[1] * (x.ndim - 1))


class GuidedTeacher:
    """A frozen teacher network with classifier-free guidance (Eq. 12)."""

    def __init__(self, net, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)

    def output(self, z, t, cond):
        """The raw network output (ε, v or x0) for a batch, unguided."""
        return self.net(z, _batch_t(t, z), cond)

    def denoise(self, z, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) for a batch, unguided."""
        t = _batch_t(t, z)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_and_eps(self.output(z, t, cond), z, alpha, sigma, self.prediction_type)

    def guided_output(self, z, t, cond, uncond, omega):
        """(1+ω)·out(z, c, t) - ω·out(z, ∅, t) in the network's own parameterisation.

        All three parameterisations are affine in the output for fixed (z, t), so guiding the output
        equals guiding ε (Eq. 12) or x0. Cond and uncond go through the network as one batch.
        `omega` is a scalar, one value per row, or R values per row (`guidance_repeats`): the network then
        runs once on the B rows and R·B outputs come back, row i under ω[i], ω[B+i], ...
        """
        t = _batch_t(t, z)
        out = self.output(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond]))
        repeats = guidance_repeats(omega, z.shape[0])
        out_c, out_u = (tile(x, repeats) for x in out.chunk(2))
        omega = append_dims(torch.as_tensor(omega, device=z.device), z.ndim).to(z)
        return out_c + omega * (out_c - out_u)

    def guided(self, z, t, cond, uncond, omega) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̃) of the augmented PF-ODE (Eq. 13); R·B rows for R values of ω per row (see `guided_output`)."""
        t = _batch_t(t, z)
        output = self.guided_output(z, t, cond, uncond, omega)
        repeats = guidance_repeats(omega, z.shape[0])
        z, t = tile(z, repeats), tile(t, repeats)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_and_eps(output, z, alpha, sigma, self.prediction_type)


class ConsistencyModel:
    """The latent consistency function f_θ(z, ω, c, t) of Eq. 9 around a student network."""

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        time_cond_proj_dim: int | None = 256,
        sigma_data: float = SIGMA_DATA,
        timestep_scaling: float = TIMESTEP_SCALING,
    ):
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.time_cond_proj_dim = time_cond_proj_dim
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    def x0(self, z, t, cond, omega) -> torch.Tensor:
        """x̂0(z, ω, c, t) from the student's raw output (no boundary scalings)."""
        t = _batch_t(t, z)
        w_emb = None
        if self.time_cond_proj_dim is not None:
            omega = torch.as_tensor(omega, device=z.device, dtype=torch.float32)
            omega = omega.expand(z.shape[0]) if omega.ndim == 0 else omega
            w_emb = guidance_embedding(omega, self.time_cond_proj_dim).to(z)
        out = self.net(z, t, cond, w_emb)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_and_eps(out, z, alpha, sigma, self.prediction_type)[0]

    def __call__(self, z, t, cond, omega) -> torch.Tensor:
        """f = c_skip(t)·z + c_out(t)·x̂0 (Eq. 9)."""
        t = _batch_t(t, z)
        return consistency_output(z, self.x0(z, t, cond, omega), t, self.sigma_data, self.timestep_scaling)
