"""A data distribution with a known score: isotropic Gaussian mixtures, for tests with known answers.

For x0 ~ Σ_k π_k N(μ_k, s²I) and z_t = α_t·x0 + σ_t·ε, every component gives z_t | k ~ N(α_t μ_k, v_t I)
with v_t = α_t² s² + σ_t², so the optimal ε-prediction is exact:

    ε̂(z_t) = E[ε | z_t] = Σ_k r_k(z_t) · σ_t (z_t - α_t μ_k) / v_t,   r_k ∝ π_k N(z_t; α_t μ_k, v_t I).

The condition c is a vector of class weights π (one-hot for a class, the prior for ∅), so the same
network is the conditional and the unconditional teacher of classifier-free guidance (Eq. 12).
For a single Gaussian the PF-ODE is linear and `gaussian_flow` is its exact solution; for mixtures and
guided fields `reference_flow` integrates it with many RK4 steps in λ.
"""

from __future__ import annotations

import torch

from latent_consistency.schedule import NoiseSchedule, append_dims


class GaussianMixtureEps:
    """The exact ε-prediction network of a Gaussian mixture, under the network contract."""

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseSchedule):
        self.means = means.double()  # [K, D]
        self.std = float(std)
        self.schedule = schedule

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, timestep_cond=None) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha.to(z)[:, None], sigma.to(z)[:, None]  # [B, 1]
        v = alpha**2 * self.std**2 + sigma**2
        diff = z[:, None, :] - alpha[:, :, None] * self.means.to(z)[None]  # [B, K, D]
        log_r = torch.log(cond.to(z)) - 0.5 * (diff**2).sum(-1) / v  # a class of weight 0: log 0 = -inf, exactly absent
        r = torch.softmax(log_r, dim=1)  # [B, K]
        return (r[:, :, None] * diff).sum(1) * (sigma / v)

    def sample(self, n: int, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 samples: component drawn from the weights `cond` [n, K] (or [K])."""
        weights = cond.double().expand(n, -1) if cond.ndim == 1 else cond.double()
        k = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.std * noise


def gaussian_flow(z_t: torch.Tensor, t, s, mean: torch.Tensor, std: float, schedule: NoiseSchedule) -> torch.Tensor:
    """Exact PF-ODE solution from t to s for x0 ~ N(mean, std²I): the standardised z is constant.

    z_s = α_s μ + √(v_s / v_t) (z_t - α_t μ),   v = α² std² + σ².
    """
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    v_t, v_s = a_t**2 * std**2 + s_t**2, a_s**2 * std**2 + s_s**2
    a_t, a_s, ratio = (append_dims(x, z_t.ndim).to(z_t) for x in (a_t, a_s, (v_s / v_t).sqrt()))
    return a_s * mean.to(z_t) + ratio * (z_t - a_t * mean.to(z_t))


def reference_flow(eps_fn, z_t: torch.Tensor, t, s, schedule: NoiseSchedule, steps: int = 2000) -> torch.Tensor:
    """Integrate the PF-ODE d(z/α)/dλ = -e^{-λ} ε(z, t(λ)) (Lu et al. 2022a, Eq. 3.4) with RK4 in λ.

    `eps_fn(z, t)` returns the (possibly guided) ε; t and s are [B] tensors. Float64 throughout.
    """
    lam_t, lam_s = schedule.lambda_(t), schedule.lambda_(s)
    h = (lam_s - lam_t) / steps

    def rhs(y, lam):
        tt = schedule.t_of_lambda(lam)
        alpha, _ = schedule.alpha_sigma(tt)
        z = append_dims(alpha, y.ndim).to(y) * y
        return -append_dims(torch.exp(-lam), y.ndim).to(y) * eps_fn(z, tt)

    alpha_t, _ = schedule.alpha_sigma(t)
    y = z_t / append_dims(alpha_t, z_t.ndim).to(z_t)
    lam = lam_t.clone()
    hb = append_dims(h, y.ndim).to(y)
    for _ in range(steps):
        k1 = rhs(y, lam)
        k2 = rhs(y + 0.5 * hb * k1, lam + 0.5 * h)
        k3 = rhs(y + 0.5 * hb * k2, lam + 0.5 * h)
        k4 = rhs(y + hb * k3, lam + h)
        y = y + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        lam = lam + h
    alpha_s, _ = schedule.alpha_sigma(s)
    return append_dims(alpha_s, y.ndim).to(y) * y
