"""Users on Apple silicon (MPS), on Windows and with DataLoader workers started by "spawn".

MPS has no float64: any float64 tensor created on or moved to it raises "Cannot convert a MPS Tensor to float64 dtype as
the MPS framework doesn't support float64". No MPS device runs here, so `mps_stand_in` plays one on the CPU: tensors "on
mps" are CPU tensors of a subclass whose results stay "on mps", a float64 one among them raises as MPS does, and mixing
one with a CPU tensor of one or more dimensions raises as a real device mismatch does.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from latent_consistency.losses import (
    GuidanceDistillationLoss,
    GuidancePairLCDLoss,
    LCDLoss,
    LCFLoss,
    ProgressiveDistillationLoss,
)
from latent_consistency.solvers import get_solver

MPS = torch.device("mps")
MPS_FLOAT64 = "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64"


class OnMPS(torch.Tensor):
    """A CPU tensor standing in for one on an MPS device."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def _names_device(value) -> bool:
    return isinstance(value, (str, torch.device)) and str(value).split(":")[0] in ("mps", "cpu", "cuda")


def _target(func, args, kwargs) -> str | None:
    """The device type a call puts its result on, None when it names none (the result goes where its inputs are)."""
    if func is torch.Tensor.cpu:
        return "cpu"
    target = kwargs.get("device")
    if target is None and func is torch.Tensor.to:
        target = next((a for a in args[1:] if _names_device(a) or isinstance(a, torch.Tensor)), None)
        if isinstance(target, torch.Tensor):
            target = MPS if isinstance(target, OnMPS) else target.device
    return None if target is None else torch.device(target).type


def _on_mps(tensor: torch.Tensor) -> OnMPS:
    if tensor.dtype == torch.float64:
        raise TypeError(f"{MPS_FLOAT64}. Please use float32 instead.")
    if isinstance(tensor, OnMPS):
        return tensor
    if tensor.grad_fn is None:  # a leaf stays a leaf (a parameter)
        return torch.Tensor._make_subclass(OnMPS, tensor, tensor.requires_grad)
    return tensor.as_subclass(OnMPS)


def _plain(tensor):
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, OnMPS) else tensor


class MPSStandIn(TorchFunctionMode):
    def __enter__(self):
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to(mps) keeps OnMPS parameters
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.device, torch._C._nn._parse_to):
            return func(*args, **kwargs)
        if func == torch.Tensor.device.__get__:
            return MPS if isinstance(args[0], OnMPS) else func(*args)
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and not isinstance(args[0], OnMPS):
            tensors = [args[0]] + [a for a in tensors[1:] if a.ndim]  # a 0-dim index is read as a number, from any device
        target = _target(func, args, kwargs)
        from_mps = any(isinstance(a, OnMPS) for a in tensors)
        if target is None and from_mps and any(not isinstance(a, OnMPS) and a.ndim for a in tensors) \
                and func not in (torch.Tensor.copy_, torch._has_compatible_shallow_copy_type):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found mps and cpu ({func.__name__})")
        args, kwargs = tree_map(lambda a: "cpu" if _names_device(a) and str(a).startswith("mps") else a, (args, kwargs))
        if func in (torch.Tensor.to, torch.Tensor.cpu) and target == "cpu":
            return _plain(func(_plain(args[0]), *args[1:], **kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        on = target == "mps" or (target is None and from_mps)
        return tree_map(lambda t: _on_mps(t) if on and isinstance(t, torch.Tensor) else t, out)


@pytest.fixture
def mps_stand_in(monkeypatch):
    """The stand-in, with `--device mps` taken as this machine's (`devices.resolve_device`)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with MPSStandIn():
        yield


def test_the_stand_in_refuses_float64_as_mps_does(mps_stand_in):
    z = torch.zeros(2, 3).to(MPS)
    assert z.device == MPS and (z + 1).device == MPS and z.cpu().device.type == "cpu"
    with pytest.raises(TypeError, match=MPS_FLOAT64):
        z.double()
    with pytest.raises(TypeError, match=MPS_FLOAT64):
        torch.ones(2, dtype=torch.float64).to(MPS)
    with pytest.raises(RuntimeError, match="same device"):
        z + torch.ones(2, 3)


@pytest.fixture(scope="module")
def tiny_models(tiny_sd, tiny_lcm):
    from latent_consistency.models import load_diffusion_model

    return load_diffusion_model(str(tiny_sd)), load_diffusion_model(str(tiny_lcm))


def _losses(teacher_model, student_model) -> dict:
    """One of each training objective over the tiny teacher, with each solver and both ways of guiding it."""
    schedule, teacher = teacher_model.schedule, teacher_model.guided_teacher()
    lcd = {f"lcd-{name}{'-increments' * increments}": LCDLoss(schedule, teacher=teacher, solver=get_solver(name), guide_increments=increments)
           for name in ("ddim", "dpm", "dpm++") for increments in (False, True)}
    return lcd | {
        "pair": GuidancePairLCDLoss(schedule, teacher=teacher, solver=get_solver("dpm++"), guidance_pair_weight=1.0, weighting="ict"),
        "lcf": LCFLoss(schedule),
        "guidance": GuidanceDistillationLoss(schedule=schedule, teacher=teacher, prediction_type=student_model.consistency_model().prediction_type),
        "progressive": ProgressiveDistillationLoss(schedule=schedule, teacher=teacher, student_steps=4),
    }


def _loss_values(losses: dict, student, device: torch.device, latents, cond) -> dict:
    return {name: loss(student, student, latents.to(device), cond.to(device), torch.zeros_like(cond).to(device),
                       torch.Generator().manual_seed(0)).cpu() for name, loss in losses.items()}


def test_every_training_objective_runs_on_mps_as_on_the_cpu(tiny_models):
    """Was: every training step on an Apple GPU stopped at its first noising with "Cannot convert a MPS Tensor to float64
    dtype": the schedule moved its float64 ᾱ to the timesteps' device (`alpha_sigma`), the boundary scalings made float64
    tensors there, and so did the DPM-Solvers' λ. The schedule's float64 arithmetic now runs on the CPU for MPS tensors and
    its values come back in float32: the losses of every objective, solver and guidance are the CPU's."""
    teacher_model, student_model = tiny_models
    losses, student = _losses(teacher_model, student_model), student_model.consistency_model()
    latents, cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 3, 32)
    with torch.no_grad():
        on_cpu = _loss_values(losses, student, torch.device("cpu"), latents, cond)
        try:
            with MPSStandIn():
                for network in (teacher_model.unet, student_model.unet):
                    network.to(MPS)
                on_mps = _loss_values(losses, student, MPS, latents, cond)
        finally:
            for network in (teacher_model.unet, student_model.unet):
                network.to("cpu")
    for name, value in on_cpu.items():
        torch.testing.assert_close(on_mps[name], value, msg=name)


def test_an_lcm_samples_on_mps_the_cpu_images(tiny_lcm, mps_stand_in):
    """Was: `lcm generate --device mps` (and every LCM sampling on an Apple GPU) stopped at its first step with "Cannot
    convert a MPS Tensor to float64 dtype". Now the same images as on the CPU, to the bit: the schedule's values are cast to
    float32 on both."""
    from latent_consistency.pipelines import LCMGenerator

    images = {}
    for device in ("cpu", "mps"):
        generator = LCMGenerator.load(str(tiny_lcm), device)
        images[device] = generator(["a red star"], generator.timesteps(2), 4.0, [0], 16, 16).cpu()
    assert torch.equal(images["mps"], images["cpu"])


def test_the_schedule_keeps_float64_where_the_device_has_it():
    """The float64 the DPM-Solvers need near t = 0 is kept on a CPU (and a CUDA GPU): only MPS gets float32."""
    from latent_consistency.parameterization import boundary_scalings
    from latent_consistency.schedule import NoiseSchedule

    schedule, t = NoiseSchedule.from_config({}), torch.tensor([0, 19, 999])
    assert all(v.dtype == torch.float64 for v in (*schedule.alpha_sigma(t), schedule.lambda_(t), *boundary_scalings(t)))
    with MPSStandIn():
        on_mps = (*schedule.alpha_sigma(t.to(MPS)), schedule.lambda_(t.to(MPS)), *boundary_scalings(t.to(MPS)))
        assert all(v.device == MPS and v.dtype == torch.float32 for v in on_mps)
    on_cpu = (*schedule.alpha_sigma(t), schedule.lambda_(t), *boundary_scalings(t))
    assert all(torch.equal(_plain(a), b.float()) for a, b in zip(on_mps, on_cpu, strict=True))


class SpawnedWorkersLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes start as on macOS and Windows: spawned, with nothing inherited from this process
    but what pickles (the dataset, its skip counter, the collate and worker_init functions)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, multiprocessing_context="spawn" if kwargs.get("num_workers") else None, **kwargs)


def test_spawned_workers_read_and_count_what_no_workers_do(tiny_models, tmp_path, monkeypatch):
    """`--num-workers 2` where workers are spawned: the same batches as without workers, and their skips and conversions
    counted once in the run's record, as forked workers count them (tests/test_dataloader_workers.py)."""
    from PIL import Image

    from latent_consistency.training.batches import TrainingBatches, merged_skipped_summary
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "data", 5)
    (folder / "1.png").write_bytes(b"not a png")
    Image.open(folder / "3.png").convert("L").save(folder / "3.png")
    monkeypatch.setattr(torch.utils.data, "DataLoader", SpawnedWorkersLoader)
    runs = {workers: TrainingBatches(str(folder), tiny_models[0], 16, 2, seed=0, num_workers=workers) for workers in (0, 2)}
    drawn = {workers: [next(batches)["latents"] for _ in range(4)] for workers, batches in runs.items()}
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], drawn[2], strict=True))
    assert merged_skipped_summary([runs[2].skipped_record()]) == "skipped: corrupt=1; converted: grayscale=1"



def test_an_evaluation_scores_features_on_mps_as_on_the_cpu(mps_stand_in):
    """Was: `lcm evaluate --device mps` stopped at its first score: torchmetrics keeps FID's and KID's sums in float64 on
    the features' device, and the feature scale and the ω response summed in float64 there. They run on the CPU now."""
    from types import SimpleNamespace

    from latent_consistency.evaluation.fid import feature_rms_of, fid_of_features, kid_of_features
    from latent_consistency.evaluation.ode_error import guidance_response

    real, fake = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(0)).unbind()
    on_cpu, on_mps = ([fid_of_features(a, b), kid_of_features(a, b, subsets=2), feature_rms_of(a)]
                      for a, b in ((real, fake), (real.to(MPS), fake.to(MPS))))
    assert on_mps == pytest.approx(on_cpu, rel=1e-5)

    def sets(z, scale):
        return [SimpleNamespace(z={9: z}, solution={9: scale * z}, cond=None, omega=scale) for scale in (1.0, 2.0)]

    def f(z, t, cond, omega):
        return omega * z

    z = torch.randn(2, 4)
    assert guidance_response(f, *sets(z.to(MPS), 1.0)) == guidance_response(f, *sets(z, 1.0)) == {9: 1.0}


def test_a_metadata_file_written_on_windows_names_the_same_images(tmp_path):
    """A dataset whose metadata.jsonl was written on Windows names "images\\0.png": each line was skipped as "missing_file" and
    each image as "no_caption" ("no usable captioned image"). Its backslashes are folder separators now, as on Windows;
    a drive's absolute path is outside the folder on every system, as /home/me/x.png is."""
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from tiny_models import write_captioned_images

    write_captioned_images(tmp_path / "images", 2)
    (tmp_path / "images" / "metadata.jsonl").unlink()
    lines = [{"file_name": "images\\0.png", "text": "a red star"}, {"file_name": ".\\images\\1.png", "text": "a blue star"},
             {"file_name": "C:\\Users\\me\\x.png", "text": "a private photo"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = ImageFolderDataset(tmp_path, 16)
    assert list(dataset.samples) == [("images/0.png", "a red star"), ("images/1.png", "a blue star")]
    assert dict(dataset.skipped.counts) == {"outside_folder": 1}


def test_lcm_imports_where_there_is_no_flock(tmp_path):
    """Windows has neither fcntl nor os.register_at_fork: importing `folder_lock` stopped every lcm command there, --help
    included, with "No module named 'fcntl'". A folder's lock is not taken there, as on a file system without flock."""
    script = ("import os, sys, random, socket, accelerate.utils.environment\n"  # these register their own fork handlers first
              "sys.modules['fcntl'] = None\n"
              "del os.register_at_fork\n"
              "from latent_consistency.folder_lock import hold, lock_file\n"
              f"with hold({str(tmp_path / 'out')!r}):\n"
              f"    print(lock_file({str(tmp_path / 'out')!r}).exists())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr
