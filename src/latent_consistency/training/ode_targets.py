"""The bank of exact targets of `lcm distill --method ode`: data latents noised to grid timesteps and solved to 0 by the
guided teacher at two guidance scales each (ours, not the paper's).

LCD (Algorithm 1) learns the consistency function f*(z_t, ω, c, t) through its own bootstrapped target
f_θ⁻(Ψ(z_{t_{n+k}}), t_n): each grid link carries only a k/T share of the teacher's guidance effect, under a
residual common to every ω, and on the built-in world a student ends LCD ignoring ω (docs/notes/2026-12-02-omega.md).
Here f* itself is computed once, `evaluation.ode_error.TeacherConsistencyFunction` (the teacher's solver in jumps of k
from t to 0, exactly the fixed point LCD trains towards), and the student regresses onto it
(`losses.ODERegressionLoss`): knowledge distillation (Luhman & Luhman 2021) in the LCM's parameterisation, with its
ω input. Each row is solved at two ω from the same z_t, so the loss sees the teacher's guidance effect Δψ directly.

One row costs about 2·⌈t/k⌉ teacher passes per ω (cond and uncond), i.e. T/k of them on average: at Stable Diffusion
scale (2,048 rows) hours of one GPU. Every process of a run solves its share of the rows (`build_ode_targets`), the
solutions are gathered, and the main process writes the bank once, into the run folder (`ode_targets.pt`, atomically, with
the settings that made it); a resumed run maps it back (`ODETargets.load`): one that cannot be read, or that records
other settings (another run's), is refused, and left as it is (one that records none, from an older version, is read with
a note).

The bank is bitwise the same whatever the process count (on one kind of device, whose kernels are deterministic, as a
rerun on one process needs, and, on a CPU, with as many threads per process: the thread count changes a network's
rounding): its rows are drawn from the data with the run's seed alone, after the data (which every
process reads whole: free from a latent cache), the data read and the rows solved in chunks that depend on the bank's
size, the latent size and the device type only (`chunk_rows`), each chunk solved whole by one process.

A run stopped while it solves its bank (Ctrl-C, SIGTERM, kill -9: at Stable Diffusion scale hours of work) keeps the
chunks solved so far, each in a file of its own in the run folder (`SolvedChunks`, `ode_targets.partial/`), and its resume
solves only the missing ones: the rows are drawn again from the seed and the data, so the bank it writes is bitwise the
uninterrupted run's. The folder goes once the bank is written.

A run whose teacher or data moved with the same content (`sources.proven_moves`) reads its bank at their old places, and
once the move is proven the bank records the new ones, as config.json does (`follow_moves`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import ELEMENTS_PER_CALL, TeacherConsistencyFunction
from latent_consistency.outputs import permit_as_umask, save_torch, write_atomic
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.progress import progress_bar
from latent_consistency.schedule import skipping_grid
from latent_consistency.training.config import canonical_source, config_from_dict

FILE = "ode_targets.pt"
PARTIAL = "ode_targets.partial"  # the folder of the chunks solved so far while a run solves its bank (`SolvedChunks`)
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
        from: not another run's).

        The file is mapped, not read (`mmap`): every process of a run loads the whole bank (its loss draws from every row),
        0.9 GB at Stable Diffusion scale, 2.8 GB at SDXL's; mapped, its pages are read as rows are drawn and shared through
        the OS page cache by the processes on a machine, where each read held a private copy of all of it (on the CPU
        until a GPU run moved it to its device; for good in a run on the CPU)."""
        again = "move it away and resume to solve the run's bank again"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


class SolvedChunks:
    """The chunks of a bank solved so far, while a run solves it: one safetensors file each in `folder` (RUN/PARTIAL), so
    that a stopped run's resume solves only the missing ones (`build_ode_targets`). Each is written by the process that
    solved it, atomically (`write_atomic`: a kill mid-write leaves a `.tmp` beside it, never read), with what it was solved
    from: the bank's settings (`bank_settings`), the device type, and a digest of its rows (`rows_digest`). It is read back
    only where all three are this run's (its settings, or `before_moves`: the same run's before its teacher or data moved),
    so that a chunk of other settings, other data or another device's arithmetic is solved again, never mixed in; and a
    file that cannot be read is solved again too."""

    def __init__(self, folder: Path, settings: str, before_moves: str | None = None):
        self.folder, self.settings, self.before_moves = folder, settings, before_moves
        self.discarded, self.other_settings = 0, None  # chunks found but not this run's, and the first one's other settings

    def path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:05d}.safetensors"

    def read(self, rows: tuple[torch.Tensor, ...], chunks: list[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """{k: solutions} of the numbered `chunks` of `rows` (z_t, t, c, ω) solved already (`read_chunk`)."""
        found = {k: self.read_chunk(k, rows, part) for k, part in chunks}
        return {k: solution for k, solution in found.items() if solution is not None}

    def read_chunk(self, k: int, rows: tuple[torch.Tensor, ...], part: torch.Tensor) -> torch.Tensor | None:
        """Chunk `k`'s solutions where its file holds them for the rows `part` of `rows`, solved on their device type with
        this run's settings; None where there is no file, or one that is not this run's (counted in `discarded`)."""
        path = self.path(k)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                recorded, solution = f.metadata() or {}, f.get_tensor("solution")
        except (OSError, SafetensorError):
            recorded, solution = {}, None
        settings = recorded.get("settings")
        ours = settings is not None and settings in (self.settings, self.before_moves)
        if ours and recorded.get("device") == rows[0].device.type and recorded.get("rows") == rows_digest(rows, part):
            return solution
        if settings is not None and not ours:
            self.other_settings = self.other_settings or settings
        self.discarded += 1
        return None

    def write(self, k: int, rows: tuple[torch.Tensor, ...], part: torch.Tensor, solution: torch.Tensor) -> None:
        """Chunk `k`'s `solution` of the rows `part` of `rows`, atomically, with what it was solved from (`read`)."""
        self.folder.mkdir(exist_ok=True)
        recorded = {"settings": self.settings, "device": rows[0].device.type, "rows": rows_digest(rows, part)}
        write_atomic(self.path(k), lambda tmp: _save_chunk(tmp, solution, recorded))

    def note(self) -> str:
        """Why the chunks found in the folder but not read (`discarded`) are solved again."""
        why = (f"with other settings ({_changes(self.other_settings, self.settings)})" if self.other_settings else
               "from other data, on another device type, or are damaged")
        return f"{self.discarded} chunk(s) of the ODE bank in {self.folder} were solved {why}: they are solved again"

    def remove(self) -> None:
        """The folder, once the bank is written (a leftover is never read: the bank is)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _save_chunk(tmp: Path, solution: torch.Tensor, recorded: dict[str, str]) -> None:
    """A chunk's file (`SolvedChunks.write`), readable as the umask says (safetensors writes its files for their owner alone)."""
    save_file({"solution": solution.cpu().contiguous()}, tmp, recorded)
    permit_as_umask(tmp)


def rows_digest(rows: tuple[torch.Tensor, ...], part: torch.Tensor) -> str:
    """sha256 of the rows `part` of the bank's `rows` (z_t, t, c, ω), bit for bit, with their indices, dtypes and shapes: a
    chunk solved before a stop is read back only for the very rows it was solved from."""
    digest = hashlib.sha256()
    for tensor in (part, *(field[part] for field in rows)):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# The bank is read and solved in chunks of rows, each solved whole by one process (`build_ode_targets`): a chunk's rows at
# both ω are one teacher batch of at most ELEMENTS_PER_CALL latent elements on a CPU (256 latents of the built-in world),
# GPU_CHUNK_ELEMENTS on a GPU (32 Stable Diffusion latents 4 x 64 x 64, which its cond-and-uncond call doubles, without
# gradients: the run's own steps hold more); and there are at least MIN_CHUNKS chunks, so that as many processes share it.
GPU_CHUNK_ELEMENTS = 2**19
MIN_CHUNKS = 16


def chunk_rows(rows: int, latent_elements: int, device: torch.device) -> int:
    """The rows per chunk of a bank of `rows` rows, for latents of `latent_elements` elements on `device`: a function of
    neither the process count nor the run's batch, so that each row's solution is bitwise the same whichever process solved
    it (a network's arithmetic depends on the batch it is computed in)."""
    budget = ELEMENTS_PER_CALL if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS
    by_memory = budget // (2 * latent_elements)
    return max(1, min(by_memory, math.ceil(rows / MIN_CHUNKS)))


@torch.no_grad()
def build_ode_targets(exact: TeacherConsistencyFunction, batches, rows: int, guidance_scale_range: tuple[float, float],
                      generator: torch.Generator, chunk: int | None = None, share: tuple[int, int] = (0, 1), gather=None,
                      progress: bool = False, solved: SolvedChunks | None = None) -> ODETargets:
    """`rows` data latents from `batches` (micro-batches {"latents", "cond"}, taken in order), each noised to a grid
    timestep t ~ U{k−1, 2k−1, …, T−1} and solved by `exact` at two ω ~ U[ω_min, ω_max] drawn independently.

    The rows are solved in chunks of `chunk` rows of like t (`solve_chunks`; one chunk of all by default); process `rank`
    of `world` (`share`) solves its share of them (`dealt`), and `gather` (every process's tensor of the same shape,
    joined in rank order: accelerate's `gather`) brings every solution to every process. Given `solved`, each chunk is
    read from it where a stopped run solved it already, and written to it once solved (the main process says how many rows
    were read: `say_solved_before`); a chunk is numbered by its place in order of t, whichever process solves it, so that a
    resume with another process count reads it too."""
    if rows < 1:
        raise UserError(f"ode_targets must be at least 1, got {rows}")
    z, t, cond, omega = drawn = draw_rows(exact, batches, rows, guidance_scale_range, generator)
    rank, world = share
    chunks = [dealt(list(enumerate(solve_chunks(t, chunk or rows))), r, world) for r in range(world)]
    shares = [torch.cat([part for _, part in mine]) if mine else t.new_zeros(0) for mine in chunks]  # the rows of each process
    longest = max(map(len, shares))
    found = solved.read(drawn, chunks[rank]) if solved is not None else {}
    if solved is not None:
        say_solved_before(solved, sum(len(part) for k, part in chunks[rank] if k in found), rows, gather, rank == 0, z.device)
    every = solve_share(exact, drawn, chunks[rank], longest, progress, found, solved)
    if gather is not None:
        every = gather(every)
    solution = z.new_empty(len(z), 2, *z.shape[1:])
    for r, index in enumerate(shares):
        solution[index] = every[r * longest:r * longest + len(index)]
    return ODETargets(z, t, cond, omega, solution)


def say_solved_before(solved: SolvedChunks, done: int, rows: int, gather, main: bool, device: torch.device) -> None:
    """On the main process: why chunks found were not this run's (`SolvedChunks.note`), and how many of the bank's `rows` a
    stopped run solved already, `done` on this process (summed over every process with `gather`, which each calls with a
    tensor on its `device`)."""
    counts = torch.tensor([done, solved.discarded], device=device)
    if gather is not None:
        counts = gather(counts).view(-1, 2).sum(0)
    done, discarded = counts.tolist()
    if not main:
        return
    if discarded:
        print(f"note: {solved.note()}", file=sys.stderr, flush=True)
    if done:
        print(f"ODE bank: {done} of {rows} rows already solved (in {solved.folder}); solving the other {rows - done}", flush=True)


def solve_share(exact: TeacherConsistencyFunction, rows: tuple[torch.Tensor, ...], chunks: list[tuple[int, torch.Tensor]], longest: int,
                progress: bool, found: dict | None = None, solved: SolvedChunks | None = None) -> torch.Tensor:
    """The solutions [longest, 2, ...] of the `rows` (z_t, t, c, ω) in the numbered `chunks`, each chunk at both ω in one
    batch, in order; zeros after them, so that every process gives `gather` a tensor of the same shape. A chunk in `found`
    ({k: its solutions}, read from `solved`) is taken from there; one solved is written to `solved`."""
    z, t, cond, omega = rows
    found = found or {}
    solutions, done = z.new_zeros(longest, 2, *z.shape[1:]), 0
    total, initial = sum(len(part) for _, part in chunks), sum(len(part) for k, part in chunks if k in found)
    with kept_on_stop(solved), progress_bar(total=total, initial=initial, desc="teacher ODE targets", unit="row",
                                            disable=not progress) as bar:  # closed before a stop's line
        for k, part in chunks:
            here = solutions[done:done + len(part)]
            if k in found:
                here.copy_(found[k])
            else:
                both = exact(torch.cat([z[part], z[part]]), torch.cat([t[part], t[part]]), torch.cat([cond[part], cond[part]]),
                             torch.cat([omega[part, 0], omega[part, 1]]))
                here.copy_(torch.stack(both.chunk(2), dim=1))
                if solved is not None:
                    solved.write(k, rows, part, here)
                bar.update(len(part))
            done += len(part)
    return solutions


@contextlib.contextmanager
def kept_on_stop(solved: SolvedChunks | None):
    """Inside it, a stop (Ctrl-C, SIGTERM's `cli.Terminated`) carries as its message where the chunks solved so far are kept
    (`solved`): the stop's one line says it after its word, and `run_folder.continued_by` adds how to go on (--resume)."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if solved is not None and not stop.args:
            stop.args = (f"while solving the ODE bank, before the run's first step: the chunks solved so far are kept in {solved.folder}",)
        raise


def draw_rows(exact: TeacherConsistencyFunction, batches, rows: int, guidance_scale_range: tuple[float, float],
              generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(z_t, t, c, ω) of the bank's `rows` rows: the first `rows` data latents, then the draws of every row at once, so that
    they are a function of the seed and the data alone, not of the micro-batches the data came in."""
    x0, cond, done = [], [], 0
    while done < rows:
        batch = next(batches)
        x0.append(batch["latents"][:rows - done].float())
        cond.append(batch["cond"][:rows - done])
        done += len(x0[-1])
    x0, cond = torch.cat(x0), torch.cat(cond)
    grid = skipping_grid(exact.schedule.num_train_timesteps, exact.skip).to(x0.device)
    w_min, w_max = (omega_from_guidance_scale(g) for g in guidance_scale_range)
    t = grid[torch.randint(len(grid), (rows,), generator=generator, device=x0.device)]
    omega = w_min + (w_max - w_min) * torch.rand(rows, 2, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return exact.schedule.add_noise(x0, noise, t), t, cond, omega


def solve_chunks(t: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The row indices of each chunk: the rows in order of t (of index among equal t), `size` at a time. Rows of like t
    share their teacher chain (`TeacherConsistencyFunction`), so a chunk costs few more passes than its rows need."""
    return list(torch.argsort(t.cpu(), stable=True).to(t.device).split(size))


def dealt(chunks: list, rank: int, world: int) -> list:
    """Process `rank`'s chunks of `world`: dealt in order of t back and forth (0, 1, …, world − 1, world − 1, …, 1, 0, 0, …),
    since a chunk's passes grow with its t, so that the processes wait for each other at the end about as little as they
    can (taken in turn, the last process would be dealt the larger chunk of every round)."""
    return [chunk for j, chunk in enumerate(chunks) if min(j % (2 * world), 2 * world - 1 - j % (2 * world)) == rank]


def ode_targets_for_run(out: Path, accelerator, make: callable, settings: str) -> ODETargets:
    """The run's bank: read from the run folder (checked to be solved with `settings`, or with those of the run's
    config.json, which a resume whose teacher or data moved rewrites only once the move is proven: `run_settings`), or
    built by every process with `make(solved)` (each its share, gathered, going on from the chunks a stopped run solved:
    `SolvedChunks` in RUN/PARTIAL) and written there by the main process, which then removes the chunks. The main
    process's folder decides which, for every process: two that decided apart would wait on each other for ever."""
    path, solved = out / FILE, SolvedChunks(out / PARTIAL, settings, run_settings(out))
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a file; the run keeps its ODE bank there: move it away and resume")
    if broadcast_object_list([path.is_file()])[0]:
        bank = ODETargets.load(path, accelerator.device, settings, solved.before_moves)
        if accelerator.is_main_process:
            solved.remove()  # left by a run killed between its bank's write and their removal
        return bank
    bank = replace(make(solved), settings=settings)
    if accelerator.is_main_process:
        bank.save(path)
        solved.remove()  # every process wrote its chunks before the gather that ended `make`
    accelerator.wait_for_everyone()  # the write only: the others have their bank already
    return bank.to(accelerator.device)


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
