"""The student θ and target θ⁻ of LCD/LCF: a full UNet with the ω input, or LoRA adapters (LCM-LoRA).

- full: the teacher's UNet plus `time_cond_proj_dim` (Section 4.2), or a copy of the LCM being fine-tuned, or of a
  PixArt-α teacher's transformer (which has no ω input to add: distilled at one guidance scale, as PixArt-LCM);
  target a separate EMA copy, or the student itself when μ = 0. Exported as a diffusers
  `LatentConsistencyModelPipeline` folder, read under the student's LCMScheduler config (which records its
  prediction type, so diffusers' LCMScheduler reads it the same way).
- lora: new peft LoRA adapters on the model's UNet (Luo et al. 2023b, LCM-LoRA; in training the teacher's own UNet,
  which runs as the teacher with them off), or, when the model carries an LCM-LoRA already, that LoRA made trainable
  on a copy; the target is the student itself unless an EMA rate is
  asked for. Exported as LoRA safetensors that diffusers' `load_lora_weights` accepts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from latent_consistency.denoisers import ConsistencyModel, denoising_network
from latent_consistency.errors import UserError
from latent_consistency.hub import check_hub_id
from latent_consistency.models import (
    DEFAULT_TIME_COND_PROJ_DIM,
    LORA_WEIGHTS_FILE,
    RUN_EXPORTS,
    DiffusionModel,
    consistency_model,
    is_lcm_config,
    load_component,
    lora_pipeline_class,
    make_student_unet,
    prediction_type_of,
    restore_frozen_parts_in_float32,
    save_lcm_pipeline,
    save_pipeline,
)
from latent_consistency.outputs import permit_as_umask
from latent_consistency.training.checkpoint import load_checkpoint
from latent_consistency.training.objectives import cast_keeping_adapters, half_precision

# The student's ω input: the projection of the ω embedding added to the time embedding (`models.make_student_unet`)
OMEGA_PROJECTION = "time_embedding.cond_proj."
# The layers LCM-LoRA adapts: attention, feed-forward, resnet convolutions, time embedding projections.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class Student:
    unet: torch.nn.Module  # trained (wrapped by accelerate after prepare)
    target_unet: torch.nn.Module  # θ⁻: a separate EMA copy, or the same module as the student
    has_separate_target: bool
    adapter: str
    scheduler_config: dict  # the LCMScheduler config it is trained, validated and exported under

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, omega_lr_scale: float = 1.0) -> list[dict]:
        """The optimiser's parameter groups: the ω projection (`OMEGA_PROJECTION`) at lr·omega_lr_scale, the rest at lr."""
        named = [(name, p) for name, p in self.unet.named_parameters() if p.requires_grad]
        omega = [p for name, p in named if OMEGA_PROJECTION in name]
        rest = [p for name, p in named if OMEGA_PROJECTION not in name]
        if omega_lr_scale == 1 or not omega:
            return [{"params": rest + omega, "lr": lr}]
        return [{"params": rest, "lr": lr}, {"params": omega, "lr": lr * omega_lr_scale}]

    def compile(self, unwrapped_unet, teacher_unet=None) -> None:
        """`--compile`: the student's, the target's and the teacher's networks compiled in place (`nn.Module.compile`, inductor;
        weights, state dicts and hooks stay the modules'). A module they share (the target when μ = 0) is compiled once. Full
        students only (`TrainConfig.check`): a LoRA student's adapters, switched off for the teacher's calls, are not
        verified under compilation."""
        modules = {id(m): m for m in (unwrapped_unet, self.target_unet, teacher_unet) if m is not None}
        for module in modules.values():
            module.compile(backend="inductor")

    def consistency_model(self, unet) -> ConsistencyModel:
        """f_θ of Eq. 9 around `unet`: the student (as accelerate wrapped it) or the target. Both share one config,
        read from the target, which is never wrapped."""
        return consistency_model(self.target_unet, self.scheduler_config, network=denoising_network(unet))

    def _weights(self, unet) -> dict[str, torch.Tensor]:
        if self.adapter == "lora":
            from peft.utils import get_peft_model_state_dict

            return get_peft_model_state_dict(unet, adapter_name=_adapter(unet))
        return unet.state_dict()

    def state_tensors(self, unwrapped_unet) -> dict[str, dict[str, torch.Tensor]]:
        tensors = {"student": self._weights(unwrapped_unet)}
        if self.has_separate_target:
            tensors["target"] = self._weights(self.target_unet)
        return tensors

    def load_checkpoint(self, path: Path) -> int:
        """Load the student and target weights of a checkpoint folder; returns its step."""
        tensors, _, state = load_checkpoint(path)
        self.load_state(tensors, path)
        return int(state["step"])

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], source: Path | str = "the checkpoint") -> None:
        """Load a checkpoint's student (and target) weights; a UserError, with nothing loaded, unless every tensor of
        `source` fits this student by name and shape and none of the student's weights is left out."""
        unets = {"student": self.unet} | ({"target": self.target_unet} if self.has_separate_target else {})
        missing = [name for name in unets if name not in tensors]
        if missing:
            raise UserError(f"{source} has no {' or '.join(missing)} weights; it is not a checkpoint of this run's student")
        for name, unet in unets.items():
            _check_fits(self._weights(unet), tensors[name], f"{source} ({name})")
        for name, unet in unets.items():
            if self.adapter == "lora":
                from peft.utils import set_peft_model_state_dict

                set_peft_model_state_dict(unet, tensors[name], adapter_name=_adapter(unet))
            else:
                unet.load_state_dict(tensors[name])

    def export(self, out: Path, unwrapped_unet, base: DiffusionModel) -> Path:
        """Write the target θ⁻ (the EMA, or the student when there is none) in diffusers format; the frozen VAE and text
        encoder go out in float32 like the student, as the model's folder holds them, whatever precision they ran in
        (`models.restore_frozen_parts_in_float32`). Its files get the umask's permissions (`permit_as_umask`, also in
        `save_pipeline`): diffusers' safetensors files are readable by their owner alone."""
        unet = self.target_unet if self.has_separate_target else unwrapped_unet
        if self.adapter == "lora":
            from diffusers import LCMScheduler

            folder = Path(out) / "lora"
            # Each part's adapter config goes beside its weights (diffusers' adapter metadata): without it a loader takes
            # lora_alpha = r, and a fine-tuned LoRA of another alpha (or per-layer ranks and alphas) would load at another scale
            parts = {"unet": _lora_part(unet, _adapter(unet))}
            # A text encoder LoRA that came with a fine-tuned LCM-LoRA is frozen, and saved as it came (diffusers names its
            # adapter "default_0", not peft's "default")
            for name, module in zip(("text_encoder", "text_encoder_2"), base.text_encoders):
                if getattr(module, "peft_config", None):
                    parts[name] = _lora_part(module, next(iter(module.peft_config)))
            kwargs = {f"{name}_lora_layers": layers for name, (layers, _) in parts.items()}
            kwargs |= {f"{name}_lora_adapter_metadata": metadata for name, (_, metadata) in parts.items()}
            lora_pipeline_class(base).save_lora_weights(folder, safe_serialization=True, **kwargs)
            # Beside the weights, the sampler settings they were distilled for (read by `models.load_lcm_lora`)
            LCMScheduler.from_config(self.scheduler_config).save_config(folder)
            return permit_as_umask(folder)
        restore_frozen_parts_in_float32(base)
        if not is_lcm_config(self.scheduler_config):  # a guidance-distilled diffusion model
            return save_pipeline(Path(out) / "guided", unet, base, self.scheduler_config)
        return save_lcm_pipeline(Path(out) / "lcm", unet, base, self.scheduler_config)


def _initial_unet(path: str, base: DiffusionModel, prediction_type: str):
    """A full student's starting UNet from another diffusers folder (with an ω input, the teacher's architecture, and
    the student's parameterisation: its output means what the loss reads it as)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = check_hub_id(path, "the student's starting UNet from")  # offline, a hub id's cached snapshot
    if not (Path(folder) / "unet").is_dir():
        raise UserError(_no_starting_unet(path, Path(folder)))
    try:
        scheduler_config = DDIMScheduler.load_config(folder, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the student's starting UNet from {path}: give a diffusers folder with unet/ and scheduler/") from err
    if not isinstance(scheduler_config, dict):
        raise UserError(f"the scheduler config of {path} is not a JSON object; give a diffusers folder with unet/ and scheduler/")
    predicts = prediction_type_of(scheduler_config)
    unet = load_component(UNet2DConditionModel, folder, "unet", use_safetensors=True)
    if predicts != prediction_type:
        raise UserError(f"the UNet of {path} predicts {predicts} and the student {prediction_type}: "
                        f"set --student-prediction {predicts}")
    if unet.config.get("time_cond_proj_dim") is None:
        raise UserError(f"the UNet of {path} has no ω input; --student-init takes a model distilled with --method guidance or an LCM")
    mismatch = [k for k in ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "sample_size", "addition_embed_type")
                if unet.config.get(k) != base.unet.config.get(k)]
    if mismatch:
        raise UserError(f"the UNet of {path} does not fit the teacher's ({', '.join(mismatch)} differ)")
    return unet.to(device=base.unet.device, dtype=torch.float32).requires_grad_(True)


def _no_starting_unet(path: str, folder: Path) -> str:
    """Why the folder `path` (read at `folder`), which has no unet/, gives a full student no starting UNet, and what to give:
    one that is gone is needed until the run's first checkpoint (`resumed_student_unet`); an LCM-LoRA has LoRA adapters and
    no UNet of its own; a training run holds its exported model in a subfolder."""
    takes = "--student-init takes a full LCM (RUN/lcm) or a model distilled with --method guidance (RUN/guided)"
    if not folder.exists():  # moved or cleared away, as a stage-one run may be once its successor started
        return (f"--student-init {path} does not exist: a run starts its student from it and needs it until its first checkpoint "
                "(a resumed run without one starts from step 0 again); put it back, or give its new place")
    if (folder / LORA_WEIGHTS_FILE).is_file():
        return f"--student-init {path} is an LCM-LoRA (LoRA adapters, no UNet of their own); {takes}"
    exports = [folder / name for name in RUN_EXPORTS if (folder / name / "unet").is_dir()]
    if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
        found = f"give the model it exported, {exports[0]}" if exports else "it has exported no LCM or guided model"
        return f"--student-init {path} is a training run's folder: {found}; {takes}"
    return f"cannot load the student's starting UNet from {path}: give a diffusers folder with unet/ and scheduler/"


def _check_lora_rank(unet, targets: list[str], rank: int) -> None:
    """A UserError for a LoRA rank above the width of every layer it adapts: ΔW = BA has rank at most min(in, out) of its
    layer (a convolution's in: channels × kernel area), so a larger rank adds parameters and memory, not expressiveness."""
    widths = [min(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else
              min(m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups, m.out_channels)
              for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(name == t or name.endswith("." + t) for t in targets)]
    if widths and rank > max(widths):
        raise UserError(f"--lora-rank {rank} is above the width of every layer a LoRA adapts in this model (at most {max(widths)}); "
                        f"a rank above a layer's width adds nothing: give --lora-rank {max(widths)} or less")


def _check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """A UserError naming the first tensor of `found` that the student lacks or holds in another shape, or the first of
    the student's (`expected`) that `found` lacks: a checkpoint of another model, rank or adapter set."""
    for name, tensor in found.items():
        if name not in expected:
            raise UserError(f"{source} holds {name}, which this run's student does not have; it is a checkpoint of another model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{source} holds {name} of shape {tuple(tensor.shape)}, this run's student "
                            f"{tuple(expected[name].shape)}; it is a checkpoint of another model")
    absent = [name for name in expected if name not in found]
    if absent:
        raise UserError(f"{source} lacks {len(absent)} of the student's tensors ({absent[0]}, ...); it is a checkpoint of another model")


def _check_omega_size(unet, config, source: str) -> None:
    """A full LCD student that starts with an ω input (--student-init, or a guidance-distilled teacher's) keeps its size: a
    --time-cond-proj-dim given (recorded in config.json) must be that size rather than be ignored. The command line resolves
    an unset one to it (`config.resolve_config`); None here is that size too."""
    size = unet.config.get("time_cond_proj_dim")
    wanted = getattr(config, "time_cond_proj_dim", None)
    if size is not None and wanted is not None and size != wanted:
        raise UserError(f"the student starts from {source}, whose ω embedding has size {size}: --time-cond-proj-dim {wanted} "
                        "cannot change it; leave it out (the student keeps its starting UNet's size)")


def _adapter(unet) -> str:
    """The name of the UNet's (one) LoRA adapter: "default" when made here, "default_0" when loaded by diffusers."""
    return unet.active_adapters()[0]


# The LoraConfig fields a LoRA's adapter metadata keeps (those diffusers' `get_peft_kwargs` infers when a file has none), and
# the ones kept only when set: diffusers loads metadata as LoraConfig(**metadata), so fields of a newer peft would not load in an
# older one
LORA_METADATA_FIELDS, LORA_METADATA_FLAGS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"), ("use_dora", "use_rslora", "lora_bias")


def _lora_part(module, adapter: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A module's LoRA adapter as diffusers' `save_lora_weights` takes it: its weights, and its LoraConfig as the adapter
    metadata that keeps its lora_alpha (and per-layer rank_pattern / alpha_pattern) when it is loaded again."""
    from peft.utils import get_peft_model_state_dict

    config = module.peft_config[adapter]
    metadata = {key: getattr(config, key) for key in LORA_METADATA_FIELDS} | {key: True for key in LORA_METADATA_FLAGS if getattr(config, key, False)}
    metadata = {key: sorted(value) if isinstance(value, set) else value for key, value in metadata.items()}
    return get_peft_model_state_dict(module, adapter_name=adapter), metadata


def make_student(config, base: DiffusionModel, scheduler_config: dict, share_unet: bool = False,
                 resumed_unet: dict | None = None) -> Student:
    """θ from the model (the student starts as the teacher, or as the LCM being fine-tuned), and θ⁻ as the config
    asks, under the student's LCMScheduler config (`training.objectives`). With `share_unet` (the training loop), new
    LoRA adapters go on the model's own UNet rather than on a copy (`base.unet_carries_student`); otherwise `base` is
    left as it is (an evaluation that makes one student per run on one loaded model). `resumed_unet` is the UNet config a
    --student-init run's checkpoint recorded (`RunFolder.save`): resuming, the student is made in it and takes its weights
    from the checkpoint, so that the folder it started from need no longer exist."""
    if config.adapter == "lora":
        from peft import LoraConfig

        # Shared, new adapters go on the model's own UNet, which then runs as the teacher (or LCF's starting model) with
        # them off (`DiffusionModel.network`): one UNet in memory, not two (an SDXL UNet: 5 GB in half precision). An
        # LCM-LoRA loaded onto the model is fine-tuned on a copy, so that the starting model stays as it came.
        carried = bool(getattr(base.unet, "peft_config", None))
        shared = share_unet and not carried
        unet = base.unet if shared else copy.deepcopy(base.unet)
        # Under mixed precision the frozen base runs in half precision, as the teacher does (an SDXL UNet: 5 GB, not 10);
        # a carried LCM-LoRA's adapters keep the weights they were given
        cast_keeping_adapters(unet, half_precision(config) or base.unet.dtype)
        unet.requires_grad_(False)
        if carried:  # an LCM-LoRA loaded onto the model: fine-tune it
            for name, param in unet.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            present = {name.split(".")[-1] for name, _ in unet.named_modules()}
            targets = [m for m in LORA_TARGET_MODULES if m.split(".")[-1] in present]
            _check_lora_rank(unet, targets, config.lora_rank)
            unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=targets))
            base.unet_carries_student = shared
        for param in unet.parameters():  # the LoRA weights train in float32 (peft makes them in the base layer's dtype)
            if param.requires_grad:
                param.data = param.data.float()
    elif getattr(config, "student_init", "") and resumed_unet is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(resumed_unet).to(device=base.unet.device, dtype=torch.float32)
    elif getattr(config, "student_init", ""):
        unet = _initial_unet(config.student_init, base, scheduler_config["prediction_type"])
        _check_omega_size(unet, config, config.student_init)
    else:
        adds_omega = base.time_cond_proj_dim is None and not base.is_transformer  # a transformer has no time_cond_proj_dim
        size = getattr(config, "time_cond_proj_dim", None) or DEFAULT_TIME_COND_PROJ_DIM
        unet = make_student_unet(base.unet, size) if adds_omega else copy.deepcopy(base.unet)
        unet.requires_grad_(True)
        _check_omega_size(unet, config, getattr(config, config.model_field))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    separate = config.target_decay > 0
    target = copy.deepcopy(unet).requires_grad_(False).eval() if separate else unet
    return Student(unet, target, separate, config.adapter, scheduler_config)
