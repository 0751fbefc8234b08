"""The two model contracts every solver, sampler and loss is written against.

A *network* is any callable `net(z, t, cond, timestep_cond=None) -> output` whose output is an ε-, v- or
x0-prediction (`UNetNetwork` adapts a diffusers UNet, `TransformerNetwork` a PixArt-α transformer, `denoising_network`
picks the one that fits; the analytic test models implement it directly).

- `GuidedTeacher` turns a network into the guided denoiser of Eq. 12 of Luo et al. 2023:
  ε̃ = (1+ω)·ε(z, c, t) - ω·ε(z, ∅, t), cond and uncond in one batch; `OmegaConditionedTeacher` is a network
  that learned to give that output from ω as an input (Guided-Distill's stage one), in one evaluation.
- `ConsistencyModel` turns a student network into the consistency function of Eq. 9:
  f(z, ω, c, t) = c_skip(t)·z + c_out(t)·x̂0(z, ω, c, t), with ω fed through `timestep_cond`.
- `WithoutAdapters` runs a network whose UNet also carries a LoRA student with the student's adapters off.
- `NegativePromptGuidance` wraps a consistency model to guide it away from a negative prompt (no uncond pass to use).
"""

from __future__ import annotations

import numbers

import torch

from latent_consistency.conditioning import AddedConditioning, PixArtConditioning
from latent_consistency.devices import weights_placement
from latent_consistency.errors import UserError
from latent_consistency.parameterization import (
    SIGMA_DATA,
    TIMESTEP_SCALING,
    check_prediction_type,
    consistency_output,
    guidance_embedding,
    x0_and_eps,
)
from latent_consistency.schedule import NoiseSchedule, append_dims, batch_rows, batch_timesteps


def check_condition(z: torch.Tensor, cond: torch.Tensor) -> None:
    """A network's c must be token rows [B, L, D], one per row of z: a clear error here, not an opaque one deep in
    the model's cross-attention."""
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or len(cond) != len(z):
        shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"the condition c must be token embeddings [B, L, D] with B = {len(z)} (one per row of z), got {shape}")


class UNetNetwork:
    """Adapts a diffusers `UNet2DConditionModel` to the network contract; an SDXL-family UNet's pooled embedding and
    micro-conditioning come out of the condition's extra row (`conditioning.AddedConditioning`)."""

    def __init__(self, unet):
        self.unet = unet
        # a UNet wrapped for distributed training (DDP) keeps its config on the module it wraps
        self.added = AddedConditioning.of_unet(getattr(unet, "module", unet).config)

    def __call__(self, z, t, cond, timestep_cond=None):
        # Integer timesteps go in as integers (as diffusers pipelines pass them), real ones as float32.
        t = t if not torch.is_floating_point(t) else t.float()
        check_condition(z, cond)
        cond, added = (cond, None) if self.added is None else self.added.unpack(cond)
        return self.unet(z, t, encoder_hidden_states=cond, timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False)[0]


class TransformerNetwork:
    """Adapts a diffusers `PixArtTransformer2DModel` to the network contract, as `PixArtAlphaPipeline` calls it: the T5
    tokens, their attention mask and a 1024-px model's size conditions come out of c (`conditioning.PixArtConditioning`);
    a learned-sigma transformer's second half of output channels (the variance) is dropped. It has no ω input."""

    def __init__(self, transformer):
        self.transformer = transformer
        module = getattr(transformer, "module", transformer)
        self.conditioning = PixArtConditioning.of_transformer(module)
        # the pipeline's test: out_channels // 2 == the latent channels
        self.learned_sigma = module.out_channels // 2 == module.config.in_channels

    def __call__(self, z, t, cond, timestep_cond=None):
        if timestep_cond is not None:
            raise ValueError("a PixArt transformer has no ω input (timestep_cond)")
        t = t if not torch.is_floating_point(t) else t.float()
        check_condition(z, cond)
        tokens, mask, added = self.conditioning.unpack(cond)
        out = self.transformer(z, encoder_hidden_states=tokens, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added,
                               return_dict=False)[0]
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out


class WithoutAdapters:
    """A frozen model's network whose module also carries a LoRA student's adapters (LCM-LoRA distilled on the teacher's
    own UNet instead of a copy of it: one UNet in memory, not two): every call runs with the adapters off, i.e. as
    the frozen model alone."""

    def __init__(self, network, module):
        self.network = network
        self.module = module

    def __call__(self, *args, **kwargs):
        self.module.disable_adapters()
        try:
            return self.network(*args, **kwargs)
        finally:
            self.module.enable_adapters()


def is_transformer(net) -> bool:
    """Whether a denoising network module is a PixArt-α transformer (else a UNet)."""
    from diffusers import PixArtTransformer2DModel

    return isinstance(getattr(net, "module", net), PixArtTransformer2DModel)


def denoising_network(net) -> UNetNetwork | TransformerNetwork:
    """The network contract around a diffusers UNet or PixArt-α transformer."""
    return TransformerNetwork(net) if is_transformer(net) else UNetNetwork(net)


def omega_embedding(omega, z: torch.Tensor, dim: int | None) -> torch.Tensor | None:
    """The ω input of a network with `time_cond_proj_dim` = dim, one row per row of z (None without one): ω one value for
    every row or one per row, in any shape (`sampling.check_omega`)."""
    if dim is None:
        return None
    omega = torch.as_tensor(omega, device=z.device, dtype=torch.float32).reshape(-1).expand(z.shape[0])
    return guidance_embedding(omega, dim).to(z)


class GuidedTeacher:
    """A frozen teacher network with classifier-free guidance (Eq. 12)."""

    shares_guidance_work = True  # the cond and uncond outputs at (z, t) serve every ω (`outputs`, `guide`)

    def __init__(self, net, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)

    def output(self, z, t, cond):
        """The raw network output (ε, v or x0) for a batch, unguided; a one-row `cond` serves every row."""
        return self.net(z, batch_timesteps(t, z), batch_rows(cond, len(z)))

    def denoise(self, z, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) for a batch, unguided."""
        return self.x0_and_eps(self.output(z, t, cond), z, t)

    def outputs(self, z, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(out(z, c, t), out(z, ∅, t)): the raw outputs for cond and uncond, as one batch through the network."""
        t, cond, uncond = batch_timesteps(t, z), batch_rows(cond, len(z)), batch_rows(uncond, len(z))  # ∅ is often one row
        return self.output(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)

    def guide(self, out_c: torch.Tensor, out_u: torch.Tensor, omega, z: torch.Tensor) -> torch.Tensor:
        """(1+ω)·out_c - ω·out_u (Eq. 12) for outputs at z; `omega` is a scalar or one value per row, in z's dtype."""
        omega = append_dims(torch.as_tensor(omega, device=z.device), z.ndim).to(z)
        return out_c + omega * (out_c - out_u)

    def guided_output(self, z, t, cond, uncond, omega):
        """(1+ω)·out(z, c, t) - ω·out(z, ∅, t) in the network's own parameterisation.

        All three parameterisations are affine in the output for fixed (z, t), so guiding the output
        equals guiding ε (Eq. 12) or x0. ω = 0 given as a number (g = 1) is the unguided output, one pass, as diffusers'
        pipelines run no unconditional pass at g <= 1.
        """
        if isinstance(omega, numbers.Real) and omega == 0:
            return self.output(z, t, cond)
        return self.guide(*self.outputs(z, t, cond, uncond), omega, z)

    def x0_and_eps(self, output, z, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from a network output at (z, t)."""
        alpha, sigma = self.schedule.alpha_sigma(batch_timesteps(t, z))
        return x0_and_eps(output, z, alpha, sigma, self.prediction_type)

    def guided(self, z, t, cond, uncond, omega) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̃) of the augmented PF-ODE (Eq. 13) at (z, t)."""
        return self.x0_and_eps(self.guided_output(z, t, cond, uncond, omega), z, t)


class OmegaConditionedTeacher(GuidedTeacher):
    """A teacher that takes ω as an input (stage one of Guided-Distill, Meng et al. 2023): its one network evaluation
    stands for classifier-free guidance's two, so the guided output costs half. `uncond` is not used."""

    shares_guidance_work = False  # no cond/uncond outputs for several ω to share

    def __init__(self, net, schedule: NoiseSchedule, prediction_type: str, time_cond_proj_dim: int):
        super().__init__(net, schedule, prediction_type)
        self.time_cond_proj_dim = time_cond_proj_dim

    def guided_output(self, z, t, cond, uncond, omega):
        """The output the network learned to give for (1+ω)·out(z, c, t) − ω·out(z, ∅, t), in one evaluation."""
        return self.net(z, batch_timesteps(t, z), batch_rows(cond, len(z)), omega_embedding(omega, z, self.time_cond_proj_dim))


class SampleClipping:
    """What an LCMScheduler config does to x̂0 before the boundary scalings, as diffusers' `LCMScheduler.step` does it:
    dynamic thresholding (`thresholding`, Saharia et al. 2022: each row clamped to ±s and divided by s, s its
    `dynamic_thresholding_ratio` quantile of |x̂0| within [1, `sample_max_value`]), else a clamp to ±`clip_sample_range`
    (`clip_sample`). Both are pixel-space habits, off in every LCM this library exports; a folder that turns one on is
    sampled as diffusers samples it."""

    def __init__(self, clip_range: float | None = None, threshold_ratio: float | None = None, threshold_max: float = 1.0):
        self.clip_range, self.threshold_ratio, self.threshold_max = clip_range, threshold_ratio, threshold_max

    @classmethod
    def of_config(cls, config: dict) -> SampleClipping | None:
        """The clipping an LCMScheduler config asks for; None when it asks for none."""
        if config.get("thresholding"):
            return cls(threshold_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
                       threshold_max=float(config.get("sample_max_value", 1.0)))
        if config.get("clip_sample"):
            return cls(clip_range=float(config.get("clip_sample_range", 1.0)))
        return None

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.threshold_ratio is None:
            return x0.clamp(-self.clip_range, self.clip_range)
        rows = x0.float().reshape(len(x0), -1)  # the quantile in float32, as diffusers upcasts half precision
        s = torch.quantile(rows.abs(), self.threshold_ratio, dim=1).clamp(1.0, self.threshold_max)[:, None]
        return (rows.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (torch before 2.4 asks it of CUDA and the CPU by two functions)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class ConsistencyModel:
    """The latent consistency function f_θ(z, ω, c, t) of Eq. 9 around a student network; `clipping` (an LCMScheduler
    config's `SampleClipping`, None in ours) acts on x̂0 before the boundary scalings. `module` is the network's diffusers
    module (a UNet or PixArt-α transformer; `models.consistency_model` gives it), whose inputs `check_inputs` knows;
    None for a network that is no such module (the analytic test models)."""

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        time_cond_proj_dim: int | None = 256,
        sigma_data: float = SIGMA_DATA,
        timestep_scaling: float = TIMESTEP_SCALING,
        clipping: SampleClipping | None = None,
        module=None,
    ):
        self.net = net
        self.module = module
        self.clipping = clipping
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.time_cond_proj_dim = time_cond_proj_dim
        self.sigma_data = sigma_data
        self.timestep_scaling = timestep_scaling

    def check_inputs(self, z: torch.Tensor, cond: torch.Tensor) -> None:
        """A UserError for latents z or a condition c the network cannot take, said here rather than as torch's convolution
        or dtype error deep inside it: z [B, C, h, w] with C its input channels, both in its dtype (noise drawn in float32
        for a bfloat16 model, or in float64 from numpy, is not cast in silence). Under autocast, which casts for the
        network, any float dtype. c's shape is the network's to check (`check_condition`)."""
        if self.module is None:
            return
        module = getattr(self.module, "module", self.module)  # a network wrapped for distributed training
        channels, dtype = int(module.config.in_channels), weights_placement(module)[1]
        if z.ndim != 4 or z.shape[1] != channels:
            raise UserError(f"the latents must be [B, {channels}, h, w] (the network's {channels} input channels), got "
                            f"{list(z.shape)}; draw the noise in that shape, e.g. torch.randn(B, {channels}, h, w)")
        if _autocasting(z.device.type):
            return
        if z.dtype != dtype:
            raise UserError(f"the latents are {z.dtype} but the network's weights are {dtype}: draw the noise in the model's dtype "
                            f"(torch.randn(..., dtype={dtype})) or convert it with .to({dtype})")
        if isinstance(cond, torch.Tensor) and cond.dtype != dtype:
            raise UserError(f"the condition c is {cond.dtype} but the network's weights are {dtype}: encode the prompts with the "
                            f"model's own text encoder (model.prompts.encode) or convert c with .to({dtype})")

    def output(self, z, t, cond, omega) -> torch.Tensor:
        """The student network's raw output (ε, v or x0) with ω fed through its `timestep_cond`."""
        return self.net(z, batch_timesteps(t, z), batch_rows(cond, len(z)), omega_embedding(omega, z, self.time_cond_proj_dim))

    def x0(self, z, t, cond, omega) -> torch.Tensor:
        """x̂0(z, ω, c, t) from the student's raw output (no boundary scalings)."""
        t = batch_timesteps(t, z)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_and_eps(self.output(z, t, cond, omega), z, alpha, sigma, self.prediction_type)[0]

    def __call__(self, z, t, cond, omega) -> torch.Tensor:
        """f = c_skip(t)·z + c_out(t)·x̂0 (Eq. 9)."""
        t = batch_timesteps(t, z)
        x0 = self.x0(z, t, cond, omega)
        if self.clipping is not None:
            x0 = self.clipping(x0)
        return consistency_output(z, x0, t, self.sigma_data, self.timestep_scaling)


class NegativePromptGuidance:
    """A negative prompt for a consistency model, which has no unconditional pass to put it in.

    An LCM's classifier-free guidance was distilled into its ω input (Eq. 12 folded into f_θ), so the
    negative prompt is guided against on the consistency function itself, at each guided step:

        f̃(z, ω, c, t) = f(z, ω, c, t) + λ·(f(z, ω, c, t) − f(z, ω, c_neg, t))

    with c and c_neg in one doubled batch (two network evaluations per guided step). Since f = c_skip·z + c_out·x̂0
    (Eq. 9) is affine in x̂0, this is f with x̂0 replaced by x̂0_c + λ·(x̂0_c − x̂0_neg); the boundary condition holds.
    λ = 0 is `model` itself. `timesteps` limits guidance to those timesteps (the first step(s) of Algorithm 3, say);
    None guides every step. `negative_cond` is one embedding for every row ([1, L, D]) or one per row ([B, L, D]).
    """

    def __init__(self, model, negative_cond: torch.Tensor, scale: float, timesteps=None):
        self.model = model
        self.schedule = model.schedule
        self.negative_cond = negative_cond
        self.scale = float(scale)
        self.timesteps = None if timesteps is None else {int(t) for t in torch.as_tensor(timesteps).reshape(-1)}

    def check_inputs(self, z: torch.Tensor, cond: torch.Tensor) -> None:
        """The latents and condition the guided model's network takes (`ConsistencyModel.check_inputs`)."""
        self.model.check_inputs(z, cond)

    def guides(self, t: torch.Tensor) -> bool:
        """Whether the step at timesteps t (one per row) is guided against the negative prompt."""
        return self.scale != 0 and (self.timesteps is None or all(int(s) in self.timesteps for s in t.tolist()))

    def __call__(self, z, t, cond, omega) -> torch.Tensor:
        t = batch_timesteps(t, z)
        if not self.guides(t):
            return self.model(z, t, cond, omega)
        cond = batch_rows(cond, len(z))  # a one-row c (one prompt for the batch) before the rows are doubled
        negative = self.negative_cond.to(cond).expand(len(z), *self.negative_cond.shape[1:])
        omega = torch.as_tensor(omega)
        omega = omega if omega.numel() == 1 else torch.cat([omega.reshape(-1)] * 2)  # one ω for every row, or one per row
        f_c, f_neg = self.model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, negative]), omega).chunk(2)
        return f_c + self.scale * (f_c - f_neg)
