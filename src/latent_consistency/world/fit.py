"""The one small training loop of the world's parts (judge, VAE, text encoder, teacher), with resumable state.

Each part supplies its modules, optimiser, LR schedule and a `loss_fn()` that draws its own batch; `Phase.fit`
runs the steps, and a `Checkpointer` saves everything every `every` steps with `training.checkpoint`
(atomic; weights in safetensors, the rest read with `torch.load(weights_only=True)`), and the type of device it trained on:
a generator's state is its device type's (a CUDA generator's is 16 bytes, a CPU one's 5056), and the numbers a GPU makes
are not a CPU's, so a checkpoint resumes on its own device type only (`saved_device`). Losses stay on the device between
saves, so a training step never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latent_consistency.errors import UserError
from latent_consistency.progress import progress_bar
from latent_consistency.training.checkpoint import list_checkpoints, load_checkpoint, read_state, save_checkpoint


class Checkpointer:
    """A training phase's resumable state: modules, optimizer, LR schedule, step, RNG and losses so far.

    With `run_dir` None nothing is saved or resumed: only the losses are recorded.
    """

    def __init__(self, run_dir: Path | None, every: int = 0):
        self.run_dir, self.every = run_dir, every
        self._losses: list[float] = []
        self._pending: list[torch.Tensor] = []

    def resume(self, modules: dict[str, torch.nn.Module], optimizer, scheduler, generator: torch.Generator | None) -> int:
        """Load the last checkpoint into the given objects, if there is one; returns the step to start at."""
        checkpoints = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        if not checkpoints:
            return 0
        tensors, objects, state = load_checkpoint(checkpoints[-1])
        saved = state.get("device")
        if saved not in (None, generator.device.type):  # `build_world` refuses it before any work; other callers here
            raise self._other_device(checkpoints[-1], saved, generator)
        for name, module in modules.items():
            module.load_state_dict(tensors[name])
        optimizer.load_state_dict(objects["optimizer"])
        scheduler.load_state_dict(objects["scheduler"])
        try:
            generator.set_state(objects["generator"]["state"])
        except RuntimeError:  # a checkpoint from before the device was recorded, with another device type's generator state
            raise self._other_device(checkpoints[-1], "another type of device", generator) from None
        self._losses = list(state["losses"])
        return int(state["step"])

    def _other_device(self, checkpoint: Path, saved: str, generator: torch.Generator) -> UserError:
        """The refusal of a checkpoint trained on `saved`, resumed with a generator of another device type."""
        return UserError(f"the checkpoint {checkpoint} was trained on {saved}, not {generator.device.type}: resume it there, or remove "
                         f"{self.run_dir} to train from the start")

    def saved_device(self) -> str | None:
        """The type of device (cpu, cuda, mps) the last checkpoint was trained on; None where there is none, or where it
        records none (written before the device was recorded) or cannot be read (`resume` refuses it then)."""
        checkpoints = list_checkpoints(self.run_dir) if self.run_dir is not None else []
        state = read_state(checkpoints[-1])[0] if checkpoints else None
        return state.get("device") if state is not None else None

    @property
    def losses(self) -> list[float]:
        if self._pending:
            self._losses += torch.stack(self._pending).float().cpu().tolist()
            self._pending.clear()
        return self._losses

    def step(self, step: int, loss: torch.Tensor, modules: dict[str, torch.nn.Module], optimizer, scheduler, generator) -> None:
        """Record the loss of `step`; save everything when `step` is a multiple of `every`."""
        self._pending.append(loss.detach())
        if self.run_dir is not None and step % self.every == 0:
            save_checkpoint(
                self.run_dir, step, {name: m.state_dict() for name, m in modules.items()},
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "generator": {"state": generator.get_state()}},
                {"step": step, "losses": self.losses, "device": generator.device.type}, keep=1,
            )  # fmt: skip


@dataclass
class Phase:
    """Where and how one part of the world trains: its device, the generator its batches are drawn from (saved with
    every checkpoint), its checkpoints, and whether a progress bar shows."""

    device: torch.device
    generator: torch.Generator | None = None
    checkpointer: Checkpointer = field(default_factory=lambda: Checkpointer(None))
    progress: bool = True

    def fit(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler,
        loss_fn: Callable[[], torch.Tensor],
        steps: int,
        desc: str = "train",
        after_step: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Minimise `loss_fn()` for `steps` optimiser steps from the last checkpoint; returns the loss of every step.

        `after_step(step)` runs after each optimiser step (an EMA update, say).
        """
        checkpointer, generator = self.checkpointer, self.generator
        start = checkpointer.resume(modules, optimizer, scheduler, generator)
        for step in progress_bar(range(start, steps), desc=desc, unit="step", disable=not self.progress, initial=start, total=steps):
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step)
            checkpointer.step(step + 1, loss, modules, optimizer, scheduler, generator)
        optimizer.zero_grad(set_to_none=True)  # the gradients of the last step are not needed
        return checkpointer.losses
