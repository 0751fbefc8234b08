"""What guidance an LCM was distilled for: the record a run writes beside its exported LCM, and what sampling makes of it.
A guidance-distilled diffusion model (Guided-Distill, `lcm distill --method guidance` or `progressive`) gets the same
record: its ω input, too, was learned over the run's range only.

An LCM learns its guidance scale g as an input over the range its run drew ω = g − 1 from (Section 4.2, Algorithm 1's
ω ~ [ω_min, ω_max]); outside that range it extrapolates, and a student whose ω response is about 0
(`training.omega_response`: the fraction of the teacher's guidance effect it reproduces) ignores g altogether. A
diffusers folder says neither, so a distillation writes `guidance.json` beside `model_index.json` (diffusers ignores
it), and `lcm generate`, `lcm serve` and `lcm evaluate` read it: its g is their default, and a g outside the range, or
g given to a student that ignores it, gets a note.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from latent_consistency.errors import UserError
from latent_consistency.outputs import write_json_atomic

RECORD = "guidance.json"
# An ω response below this at every t: the student's images hardly change with g
IGNORED_BELOW = 0.1
# In a fine-tuned LCM's record: its ω response was measured when the LCM it was fine-tuned from was distilled
INHERITED = "omega_response_before_fine_tuning"


@dataclass(frozen=True)
class GuidanceRecord:
    """The guidance range [`guidance_scale_min`, `guidance_scale_max`] an LCM was distilled on, the g to sample it at
    by default, and its ω response per timestep t (None where it was not measured): at the end of its run, or with
    `inherited` at the end of the distillation of the LCM it was fine-tuned from (LCF teaches no guidance)."""

    guidance_scale_min: float
    guidance_scale_max: float
    guidance_scale: float
    omega_response: dict[int, float] | None = None
    inherited: bool = False

    @classmethod
    def of_run(cls, guidance_scale_min: float, guidance_scale_max: float, validation_guidance_scale: float,
               omega_response: dict[int, float] | None) -> GuidanceRecord:
        """A run's record: its default g is the validation grid's, moved into the trained range when it lies outside."""
        default = min(max(validation_guidance_scale, guidance_scale_min), guidance_scale_max)
        return cls(guidance_scale_min, guidance_scale_max, default, omega_response)

    @classmethod
    def of_fine_tuning(cls, base: GuidanceRecord | None, guidance_scale_min: float, guidance_scale_max: float,
                       validation_guidance_scale: float) -> GuidanceRecord:
        """A fine-tuning run's record (LCF, Algorithm 4: no teacher to measure an ω response against). LCF teaches no
        guidance: an LCM whose record (`base`) says the range its ω input was distilled on keeps that range, whatever range
        the run drew ω from (`fine_tuning_note`), and the ω response its distillation measured, marked `inherited` (an LCM
        that ignored g still does, and its notes still say so); an LCM without one (from elsewhere) gets the run's range."""
        if base is None:
            return cls.of_run(guidance_scale_min, guidance_scale_max, validation_guidance_scale, None)
        record = cls.of_run(base.guidance_scale_min, base.guidance_scale_max, validation_guidance_scale, base.omega_response)
        return replace(record, inherited=base.omega_response is not None)

    def fine_tuning_note(self, guidance_scale_min: float, guidance_scale_max: float) -> str | None:
        """A note when a fine-tuning run of this LCM draws g outside the range it was distilled on (None inside it)."""
        low, high = self.guidance_scale_min, self.guidance_scale_max
        return self._range_note(guidance_scale_min, guidance_scale_max,
                                "this LCM was distilled on: fine-tuning teaches no guidance, so there its ω input still extrapolates, "
                                f"and the fine-tuned model keeps the record [{low:g}, {high:g}]")

    def teacher_note(self, guidance_scale_min: float, guidance_scale_max: float) -> str | None:
        """A note when distilling from this guidance-distilled teacher over g outside the range its ω input learned (None
        inside it): the teacher's guidance extrapolates there, and so would the student's targets."""
        return self._range_note(guidance_scale_min, guidance_scale_max,
                                "this guidance-distilled teacher's ω input learned: its guidance extrapolates there, and so do the targets")

    def _range_note(self, guidance_scale_min: float, guidance_scale_max: float, what: str) -> str | None:
        """"[min, max] reaches outside" this record's range, then `what` that range is and why it matters; None inside it."""
        low, high = self.guidance_scale_min, self.guidance_scale_max
        if low <= guidance_scale_min and guidance_scale_max <= high:
            return None
        return (f"the guidance range [{guidance_scale_min:g}, {guidance_scale_max:g}] reaches outside [{low:g}, {high:g}], the range "
                f"{what}; give --guidance-scale-min and --guidance-scale-max inside it")

    def ignores_guidance(self) -> bool:
        """Whether the measured ω response is below `IGNORED_BELOW` at every t (False when it was not measured)."""
        return bool(self.omega_response) and max(self.omega_response.values()) < IGNORED_BELOW

    def notes(self, guidance_scale: float, given: bool) -> list[str]:
        """What a user sampling at `guidance_scale` should know: that it lies outside the trained range, and (when they
        `given` it themselves) that this LCM ignores it."""
        notes = []
        if not self.guidance_scale_min <= guidance_scale <= self.guidance_scale_max:
            notes.append(f"guidance scale {guidance_scale:g} is outside [{self.guidance_scale_min:g}, {self.guidance_scale_max:g}], "
                         "the range this model's ω input was distilled on: it extrapolates there")
        if given and self.ignores_guidance():
            most = round(max(self.omega_response.values()), 2) + 0.0  # a response that rounds to zero: 0.00, not -0.00
            when = " before it was fine-tuned (LCF teaches no guidance)" if self.inherited else ""
            notes.append(f"this LCM ignores its guidance scale (its ω response was at most {most:.2f} at every t{when}, where 1 "
                         "is the teacher's guidance effect): its images hardly change with it")
        return notes

    def to_json(self) -> dict:
        response = None if self.omega_response is None else {str(t): r for t, r in self.omega_response.items()}
        return ({"guidance_scale_min": self.guidance_scale_min, "guidance_scale_max": self.guidance_scale_max,
                 "guidance_scale": self.guidance_scale, "omega_response": response} | ({INHERITED: True} if self.inherited else {}))


def write_record(folder: Path, record: GuidanceRecord) -> None:
    write_json_atomic(Path(folder) / RECORD, record.to_json())


def read_record(name_or_path: str | Path) -> GuidanceRecord | None:
    """The record of a local LCM folder; None for a folder without one (an LCM from elsewhere) or a hub id. A damaged
    record is a UserError naming the file: the model's default g would otherwise be wrong without a word."""
    path = Path(name_or_path) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return _parse(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path} is damaged ({err}); delete it to sample the LCM without its guidance record") from None


def _parse(data) -> GuidanceRecord:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    low, high, default = (_finite(data.get(k), k) for k in ("guidance_scale_min", "guidance_scale_max", "guidance_scale"))
    if low < 1:  # an ω input is trained on ω = g - 1 >= 0 (`parameterization.check_guidance_scale_range`)
        raise ValueError(f"guidance_scale_min {low:g} is below 1")
    if not low <= default <= high:
        raise ValueError(f"guidance_scale {default:g} is outside [{low:g}, {high:g}]")
    response = data.get("omega_response")
    if response is not None:
        response = {int(t): _finite(r, f"omega_response at t = {t}") for t, r in response.items()}
    inherited = data.get(INHERITED, False)
    if not isinstance(inherited, bool):
        raise ValueError(f"{INHERITED} is {inherited!r}, not true or false")
    return GuidanceRecord(low, high, default, response, inherited and response is not None)


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a finite number")
    return float(value)
