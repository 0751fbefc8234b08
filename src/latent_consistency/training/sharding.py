"""Sharded training of a full student: θ and θ⁻ under FSDP2 (PyTorch's `fully_shard`), through accelerate.

Launched with `accelerate launch --config_file configs/accelerate/fsdp.yaml ...` (docs/scale.md), accelerate shards the
student θ and its optimiser state when the loop prepares them. This module does the rest:

- the target θ⁻ is sharded the same way (`shard_target`): FSDP2 shards every parameter along its first dimension over
  the same processes, whatever the wrapping, so each process's shard of θ⁻ holds the same elements as its shard of θ and
  the EMA of Algorithm 1 (`ema.ema_update`) is a purely local update; θ⁻ costs 4 bytes/param / processes, not 4;
- checkpoints hold full (unsharded) state dicts, gathered from all processes and written by the main one
  (`full_training_state`): the same files an unsharded run writes, so either kind of run resumes the other's;
- the optimiser state is saved keyed by parameter name and loaded after the student is sharded (`load_optimizer_state`);
- the export is an ordinary diffusers folder, from an unsharded copy of the network gathered on the main process
  (`exportable`).

Without FSDP each function is the plain call, so the loop keeps one path. FSDP1 (fsdp_version 1) and DeepSpeed are
refused with a message (`check_sharding`): FSDP1 flattens parameters, so θ and θ⁻ would not shard alike.
"""

from __future__ import annotations

import dataclasses

import torch

from latent_consistency.errors import UserError

# The process groups of ended runs, never freed: `end_process_group`
_ENDED_GROUPS: list = []


def end_process_group(accelerator) -> None:
    """`accelerator.end_training()` (which destroys the process group), with the group itself kept until the process
    ends. Freed as the run's objects go (DDP's reducer holds it), its destructor waits, holding the GIL, for gloo's
    worker thread, which may still be releasing the last collective it ran (the final barrier, holding `gather_object`'s
    tensors), and that release needs the GIL: a deadlock, seen as a finished two-process run that never exited (gdb:
    ~ProcessGroupGloo on the main thread, ~AsyncBarrierWork -> decref_pyobject on `pt_gloo_runloop`). Kept, it goes
    with the process: `cli.end_process` ends a multi-process run's process without destructors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _ENDED_GROUPS.append(dist.group.WORLD)
    accelerator.end_training()


def is_sharded(accelerator) -> bool:
    """Whether the student is sharded (accelerate's FSDP distributed type)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(accelerator, config) -> None:
    """Refuse the sharded set-ups the loop does not support, before anything is loaded."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed is not supported: shard a full student with FSDP2, "
                        "`accelerate launch --config_file configs/accelerate/fsdp.yaml` (docs/scale.md)")
    if not is_sharded(accelerator):
        return
    if not accelerator.is_fsdp2:
        raise UserError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)")
    if config.adapter != "full":
        raise UserError("FSDP shards a full student; a LoRA student trains with plain data parallelism (accelerate launch --multi_gpu)")
    if getattr(config, "optimizer", "adamw") == "adamw-8bit":
        raise UserError("--optimizer adamw-8bit does not take sharded parameters; under FSDP use adamw or adamw-fused "
                        "(the moments are sharded already, docs/scale.md)")


def sharding_note(accelerator) -> str | None:
    """A note when the launcher's accelerate config asks for FSDP (`accelerate launch` sets ACCELERATE_USE_FSDP from its
    distributed_type) and the student is not sharded: accelerate turns FSDP on only on accelerators (GPUs) and leaves
    processes on CPUs (gloo) in plain data parallelism, dropping the plugin (docs/scale.md, "What is tested"). The run
    trains as it would there, but each process holds the whole student, θ⁻ and optimiser state, which a user who chose
    FSDP for its memory expects to be split."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP") or is_sharded(accelerator):
        return None
    return ("the accelerate config asks for FSDP, which accelerate applies only on GPUs: on these CPU processes the student is not "
            "sharded; each process holds all of it, its target and its optimiser state (plain data parallelism)")


def shard_target(accelerator, student) -> None:
    """Shard a separate target θ⁻ exactly as accelerate sharded the student (same plugin: wrapping, mesh, precision)."""
    if is_sharded(accelerator) and student.has_separate_target:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        student.target_unet = fsdp2_prepare_model(accelerator, student.target_unet)
        # θ⁻ has no backward pass: after each forward every unit is freed, also those FSDP2 and accelerate keep gathered
        # for a backward (the root; the final norm), so θ⁻'s parameters are shards whenever the EMA update runs
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in student.target_unet.modules() if isinstance(m, FSDPModule)]

        def reshard_all(module, args, output) -> None:
            for unit in units:
                unit.reshard()

        student.target_unet.register_forward_hook(reshard_all)


def full_state_dict(accelerator, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on the main process, in CPU memory (None elsewhere); collective when sharded."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(module).state_dict() if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if accelerator.is_main_process else None


def _inner(optimizer):
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def full_training_state(accelerator, student, optimizer) -> tuple[dict | None, dict | None]:
    """(student/target tensors, optimiser state) of a checkpoint on the main process, (None, None) elsewhere. Unsharded:
    `Student.state_tensors` and the optimiser's own state dict; sharded: both gathered in full (a collective: every process
    calls it), the optimiser state keyed by parameter name."""
    if not is_sharded(accelerator):
        if not accelerator.is_main_process:
            return None, None
        return student.state_tensors(accelerator.unwrap_model(student.unet)), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tensors = {"student": full_state_dict(accelerator, student.unet)}
    if student.has_separate_target:
        tensors["target"] = full_state_dict(accelerator, student.target_unet)
    state = get_optimizer_state_dict(student.unet, _inner(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return (tensors, state) if accelerator.is_main_process else (None, None)


def _keyed_by_name(saved: dict, model: torch.nn.Module, optimizer) -> dict:
    """An optimiser state dict keyed by parameter index (torch's own format) re-keyed by parameter name, the format
    PyTorch's distributed `set_optimizer_state_dict` reads. The index is the parameter's place in the param groups."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in _inner(optimizer).param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}


def load_optimizer_state(accelerator, model: torch.nn.Module, optimizer, saved: dict) -> None:
    """Load a checkpoint's optimiser state into the prepared (possibly sharded) optimiser. A state keyed by index (an
    unsharded run's) loads as it always did when unsharded; a state keyed by name (a sharded run's), or any state into a
    sharded run, goes through PyTorch's `set_optimizer_state_dict`, which shards the full tensors."""
    by_name = bool(saved["state"]) and isinstance(next(iter(saved["state"])), str)
    if not by_name and not is_sharded(accelerator):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model = model if is_sharded(accelerator) else accelerator.unwrap_model(model)
    if not by_name:
        saved = _keyed_by_name(saved, model, optimizer)
    set_optimizer_state_dict(model, _inner(optimizer), saved, options=StateDictOptions(full_state_dict=True))


def _unsharded_class(module: torch.nn.Module) -> type:
    """The model class under FSDP2's dynamic subclass (`FSDPUNet2DConditionModel` -> `UNet2DConditionModel`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(accelerator, module: torch.nn.Module) -> torch.nn.Module | None:
    """An ordinary (unsharded, CPU) copy of a sharded diffusers model on the main process, None elsewhere (collective)."""
    from accelerate import init_empty_weights

    state = full_state_dict(accelerator, module)
    if not accelerator.is_main_process:
        return None
    with init_empty_weights(include_buffers=False):
        copy = _unsharded_class(module).from_config(module.config)
    copy.load_state_dict(state, assign=True)
    return copy.requires_grad_(False).eval()


def exportable(accelerator, student):
    """(student, unwrapped student network) for `Student.export` on the main process. Sharded: the network that is
    exported (θ⁻, or θ without a separate target) gathered into an unsharded copy (a collective: every process calls it)."""
    if not is_sharded(accelerator):
        return student, accelerator.unwrap_model(student.unet)
    full = unsharded_copy(accelerator, student.target_unet if student.has_separate_target else student.unet)
    return dataclasses.replace(student, unet=full, target_unet=full), full
