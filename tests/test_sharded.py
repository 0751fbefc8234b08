"""Sharded training of a full student (FSDP2 through accelerate, `training.sharding`, docs/scale.md) on two CPU processes:
it trains what plain data parallelism trains, only the main process writes, a killed run resumes exactly, and the export
is an ordinary diffusers folder.

accelerate enables FSDP on accelerators only; `fsdp_on_cpu.py` sets it on gloo CPU processes (it says why and how), and
the runs are launched with the repo's own configs/accelerate/fsdp.yaml.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from latent_consistency.errors import UserError
from two_processes import DATA_PARALLEL, launch

REPO = Path(__file__).resolve().parents[1]
UNET = "lcm/unet/diffusion_pytorch_model.safetensors"
LAST = "checkpoints/step-0000004"


def sharded(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return launch(["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml")], [str(REPO / "tests" / "fsdp_on_cpu.py"), *args], env)


def data_parallel(args: list[str]) -> subprocess.CompletedProcess:
    return launch(DATA_PARALLEL, ["-m", "latent_consistency.cli", *args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny teacher with two channels per GroupNorm group. With one (the tiny models' 32 channels in 32 groups), the
    biases just before a GroupNorm (conv1, time_emb_proj) have an exactly zero gradient, and AdamW turns its rounding
    noise into ±lr steps that differ between any two orders of summation: no tolerance could compare two runs."""
    from diffusers import UNet2DConditionModel

    from tiny_models import save_tiny_sd

    folder = save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    UNet2DConditionModel.from_config(config, norm_num_groups=16).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 24)


def distill(teacher, images, out) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(images), "--out", str(out), "--batch-size", "4"]


@pytest.fixture(scope="module")
def sharded_run(teacher, images, tmp_path_factory):
    """A sharded 4-step run (checkpoints at steps 2 and 4) and its output."""
    out = tmp_path_factory.mktemp("runs") / "sharded"
    done = sharded(distill(teacher, images, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts}


@pytest.mark.slow
def test_sharded_run_trains_what_data_parallelism_trains_and_only_rank0_writes(sharded_run, teacher, images, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    out, stdout = sharded_run
    reference = tmp_path / "ddp"
    done = data_parallel(distill(teacher, images, reference))
    assert done.returncode == 0, done.stderr[-3000:]
    # The same files, written once: one metrics line per step, one export
    assert files(out) == files(reference)
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4]
    assert stdout.count("exported") == 1
    # The same losses and weights, to float rounding (FSDP2 reduce-scatters sharded gradients where DDP all-reduces whole
    # ones); lr 1e-4 x 4 steps moves a weight by up to 4e-4, the scale of any real difference (a missed reduction, a
    # target updated from the wrong shard)
    for ours, theirs in zip(metrics(out), metrics(reference)):
        assert ours.keys() == theirs.keys()
        for key in ("loss", "grad_norm"):
            if key in ours:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["step"], key)
    start = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, atol in (("student", 1e-5), ("target", 1e-6)):
        ours, theirs = (load_file(str(run / LAST / f"{name}.safetensors")) for run in (out, reference))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=f"{name} {key}")
        moved = max((ours[k] - start[k]).abs().max().item() for k in ours if k in start)
        assert moved > 20 * atol, f"the {name} hardly moved ({moved}): the comparison would say nothing"
    exported, target = load_file(str(out / UNET)), load_file(str(out / LAST / "target.safetensors"))
    assert exported.keys() == target.keys() and all(torch.equal(exported[k], target[k]) for k in exported)
    # An ordinary diffusers folder
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_killed_sharded_run_resumes_exactly(sharded_run, teacher, images, tmp_path):
    reference, _ = sharded_run
    out = tmp_path / "killed"
    killed = sharded(distill(teacher, images, out), env={"LCM_TEST_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode != 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"] and not (out / "lcm").exists()
    resumed = sharded([*distill(teacher, images, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in (UNET, f"{LAST}/student.safetensors", f"{LAST}/target.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ours, theirs = (torch.load(run / LAST / "optimizer.pt", weights_only=True) for run in (out, reference))
    assert ours["state"].keys() == theirs["state"].keys()
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(theirs["state"][k][s])) for k in ours["state"] for s, v in ours["state"][k].items())
    assert [m for m in metrics(out) if m["step"] == 4 and "loss" not in m] == [m for m in metrics(reference) if m["step"] == 4 and "loss" not in m]
    assert [m["loss"] for m in metrics(out) if "loss" in m][-2:] == [m["loss"] for m in metrics(reference) if "loss" in m][-2:]


def _stepped(model, seed: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    return optimizer


def test_optimizer_state_keyed_by_name_loads_as_the_indexed_one():
    """A sharded run saves the optimiser state keyed by parameter name, an unsharded one by index: either loads into an
    unsharded run, and an indexed one is re-keyed by name for a sharded one."""
    from accelerate.utils import DistributedType

    from latent_consistency.training.sharding import _keyed_by_name, load_optimizer_state

    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, unwrap_model=lambda m: m)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    saved = _stepped(model, 0).state_dict()
    model.zero_grad(set_to_none=True)  # as at resume
    by_name = _keyed_by_name(saved, model, torch.optim.AdamW(model.parameters()))
    assert set(by_name["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"} and by_name["param_groups"][0]["params"][0] == "0.weight"
    for state in (saved, by_name):
        fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
        load_optimizer_state(accelerator, model, fresh, state)
        loaded = fresh.state_dict()
        assert loaded["param_groups"][0]["lr"] == 1e-2
        for i, s in saved["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(loaded["state"][i][k])) for k, v in s.items())


def test_deepspeed_fsdp1_and_sharded_lora_or_8bit_are_refused():
    from accelerate.utils import DistributedType

    from latent_consistency.training.sharding import check_sharding

    full, lora, eight_bit = (SimpleNamespace(adapter=a, optimizer=o) for a, o in (("full", "adamw"), ("lora", "adamw"), ("full", "adamw-8bit")))
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    check_sharding(fsdp2, full)
    check_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False), lora)
    for accelerator, config, says in ((SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False), full, "DeepSpeed"),
                                      (SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False), full, "fsdp_version: 2"),
                                      (fsdp2, lora, "LoRA"), (fsdp2, eight_bit, "adamw-8bit")):
        with pytest.raises(UserError, match=says):
            check_sharding(accelerator, config)


def test_fused_adamw_is_asked_of_torch():
    from latent_consistency.training.config import DistillConfig
    from latent_consistency.training.loop import build_optimizer

    student = SimpleNamespace(parameter_groups=lambda lr, scale: [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr}])
    assert build_optimizer(DistillConfig(optimizer="adamw-fused"), student).defaults["fused"] is True
    assert not build_optimizer(DistillConfig(), student).defaults["fused"]
    with pytest.raises(UserError, match="optimizer 'sgd' is not one of"):
        DistillConfig(optimizer="sgd", teacher="t", data="d", out="o").check()


def test_8bit_adamw_is_bitsandbytes_and_says_how_to_get_it(monkeypatch):
    from latent_consistency.training.config import DistillConfig
    from latent_consistency.training.loop import build_optimizer

    student = SimpleNamespace(parameter_groups=lambda lr, scale: [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr}])
    config = DistillConfig(optimizer="adamw-8bit")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "bitsandbytes", None)  # not installed
        with pytest.raises(UserError, match="pip install bitsandbytes"):
            build_optimizer(config, student)
    bitsandbytes = pytest.importorskip("bitsandbytes")
    assert isinstance(build_optimizer(config, student), bitsandbytes.optim.AdamW8bit)
