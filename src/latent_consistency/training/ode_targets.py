"""The bank of exact targets of `lcm distill --method ode`: data latents noised to grid timesteps and solved to 0 by the
guided teacher at two guidance scales each (ours, not the paper's).

LCD (Algorithm 1) learns the consistency function f*(z_t, ω, c, t) through its own bootstrapped target
f_θ⁻(Ψ(z_{t_{n+k}}), t_n): each grid link carries only a k/T share of the teacher's guidance effect, under a
residual common to every ω, and on the built-in world a student ends LCD ignoring ω (docs/notes/2026-12-02-omega.md).
Here f* itself is computed once, `evaluation.ode_error.TeacherConsistencyFunction` (the teacher's solver in jumps of k
from t to 0, exactly the fixed point LCD trains towards), and the student regresses onto it
(`losses.ODERegressionLoss`): knowledge distillation (Luhman & Luhman 2021) in the LCM's parameterisation, with its
ω input. Each row is solved at two ω from the same z_t, so the loss sees the teacher's guidance effect Δψ directly.

One row costs about 2·⌈t/k⌉ teacher passes per ω (cond and uncond), i.e. T/k of them on average: the bank is built
once, into the run folder (`ode_targets.pt`, written atomically by the main process with the settings that made it), and
a resumed run reads it back: one that cannot be read, or that records other settings (another run's), is refused, and
left as it is (one that records none, from an older version, is read with a note). Its rows are drawn from the data
with the run's seed alone, so the bank does not depend on the process count. A run whose teacher or data moved with the
same content (`sources.proven_moves`) reads its bank at their old places, and once the move is proven the bank records
the new ones, as config.json does (`follow_moves`).
"""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.outputs import save_torch, write_atomic
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.schedule import skipping_grid
from latent_consistency.training.config import canonical_source, config_from_dict

FILE = "ode_targets.pt"
# The config fields a bank is a function of, recorded in its file: a bank recording other values is another run's
SETTINGS = ("teacher", "data", "resolution", "seed", "solver", "skip", "guidance_scale_min", "guidance_scale_max", "ode_targets")
TENSORS = ("z", "t", "cond", "omega", "solution")  # the fields of a bank that are tensors
# What torch.load raises on a file that is not a whole torch file (truncated, empty, text, a pickle of other objects)
UNREADABLE = (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError)


def bank_settings(config) -> str:
    """The values of `SETTINGS` in `config`, as the JSON text a bank file records (the teacher and data as every spelling
    of them is: `config.canonical_source`)."""
    values = {name: getattr(config, name) for name in SETTINGS}
    return json.dumps(values | {name: canonical_source(values[name]) for name in ("teacher", "data")}, sort_keys=True)


@dataclass
class ODETargets:
    """Rows (z_t, t, c) with the teacher's solutions at two guidance weights: `solution[:, i]` = f*(z_t, omega[:, i], c, t)."""

    z: torch.Tensor  # [M, C, H, W]
    t: torch.Tensor  # [M] grid timesteps
    cond: torch.Tensor  # [M, L, D]
    omega: torch.Tensor  # [M, 2]
    solution: torch.Tensor  # [M, 2, C, H, W]
    settings: str = ""  # the run settings it was solved with (`bank_settings`), recorded in its file

    def __len__(self) -> int:
        return len(self.z)

    def to(self, device) -> ODETargets:
        return ODETargets(*(getattr(self, name).to(device) for name in TENSORS), settings=self.settings)

    def save(self, path: Path) -> None:
        """Atomically: a temporary file beside `path`, then rename (a killed build leaves no bank behind)."""
        write_atomic(path, lambda tmp: save_torch({name: getattr(self, name).cpu() for name in TENSORS} | {"settings": self.settings}, tmp))

    @classmethod
    def load(cls, path: Path, device="cpu", settings: str | None = None, before_moves: str | None = None) -> ODETargets:
        """The bank in `path`; a UserError, the file left as it is, unless it is a whole bank (and, given `settings`, one
        solved with them or with `before_moves`, the same run's settings at the places its teacher and data were moved
        from: not another run's)."""
        again = "move it away and resume to solve the run's bank again"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE:  # torch's own message would suggest weights_only=False: a pickle's code run
            raise UserError(f"the ODE bank {path} cannot be read (a damaged file, or not one this tool wrote); {again}") from None
        if not isinstance(saved, dict) or not all(isinstance(saved.get(name), torch.Tensor) for name in TENSORS):
            raise UserError(f"{path} is not an ODE bank; {again}")
        recorded = saved.get("settings")
        bank = cls(**{name: saved[name] for name in TENSORS}, settings=recorded if isinstance(recorded, str) else "")
        if settings is not None and not bank.settings:  # written before banks recorded their settings: nothing to compare
            print(f"note: the ODE bank {path} records no settings (written by an older version); it is read as this run's",
                  file=sys.stderr)
        elif settings is not None and bank.settings not in (settings, before_moves):
            raise UserError(f"the ODE bank {path} was not solved with this run's settings ({_changes(bank.settings, settings)}); "
                            f"it is another run's: {again}")
        return bank.to(device)


def _changes(recorded: str, settings: str) -> str:
    """'field: recorded -> wanted' for each of `SETTINGS` that a bank's recorded settings give another value."""
    try:
        before = json.loads(recorded)
    except ValueError:
        before = None
    if not isinstance(before, dict):
        return "it records none"
    return "; ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in json.loads(settings).items() if before.get(k) != v)


@torch.no_grad()
def build_ode_targets(exact: TeacherConsistencyFunction, batches, rows: int, guidance_scale_range: tuple[float, float],
                      generator: torch.Generator, progress: bool = False) -> ODETargets:
    """`rows` data latents from `batches` (micro-batches {"latents", "cond"}, taken in order), each noised to a grid
    timestep t ~ U{k−1, 2k−1, …, T−1} and solved by `exact` at two ω ~ U[ω_min, ω_max] drawn independently."""
    if rows < 1:
        raise UserError(f"ode_targets must be at least 1, got {rows}")
    grid = skipping_grid(exact.schedule.num_train_timesteps, exact.skip)
    w_min, w_max = (omega_from_guidance_scale(g) for g in guidance_scale_range)
    parts, done = [], 0
    with tqdm(total=rows, desc="teacher ODE targets", disable=not progress) as bar:  # closed before a stop's one line
        while done < rows:
            batch = next(batches)
            x0, cond = batch["latents"][:rows - done].float(), batch["cond"][:rows - done]
            b, device = len(x0), x0.device
            t = grid.to(device)[torch.randint(len(grid), (b,), generator=generator, device=device)]
            omega = w_min + (w_max - w_min) * torch.rand(b, 2, generator=generator, device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            z = exact.schedule.add_noise(x0, noise, t)
            both = exact(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([omega[:, 0], omega[:, 1]]))
            parts.append((z, t, cond, omega, torch.stack(both.chunk(2), dim=1)))
            done += b
            bar.update(b)
    return ODETargets(*(torch.cat(column) for column in zip(*parts)))


def ode_targets_for_run(out: Path, accelerator, make: callable, settings: str) -> ODETargets:
    """The run's bank: read from the run folder (checked to be solved with `settings`, or with those of the run's
    config.json, which a resume whose teacher or data moved rewrites only once the move is proven: `run_settings`), or
    built by the main process with `make()` and written there first."""
    path = out / FILE
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a file; the run keeps its ODE bank there: move it away and resume")
    if accelerator.is_main_process and not path.is_file():
        replace(make(), settings=settings).save(path)
    accelerator.wait_for_everyone()
    return ODETargets.load(path, accelerator.device, settings, run_settings(out))


def run_settings(out: Path) -> str | None:
    """The bank settings of the run's config.json; None where it cannot be read. A resume differs from them only in what
    `run_folder.check_resumable` lets differ: no setting of a bank, but the teacher and data moved with the same content."""
    try:
        return bank_settings(config_from_dict(json.loads((out / "config.json").read_text())))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError):
        return None


def follow_moves(out: Path, moves: dict[str, tuple[str, str]], config) -> None:
    """Record the settings of `config` in the run's bank once a resume proved that the teacher or data it was solved from
    moved with the same content (`moves`: `RunFolder.resume`), so that it names their new places as config.json does and
    the next resume reads it. Written atomically and before config.json: a run killed between the two resumes with either.
    A run without a bank (any other method, LCF) has nothing to follow."""
    path = out / FILE
    if not path.is_file() or not {"teacher", "data"} & moves.keys():
        return
    settings = bank_settings(config)
    bank = ODETargets.load(path)
    if bank.settings and bank.settings != settings:
        replace(bank, settings=settings).save(path)
