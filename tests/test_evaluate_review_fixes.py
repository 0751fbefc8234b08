"""Fixes from a review of `lcm evaluate` with a user's own models: `lcm evaluate sweep` on a run of a teacher that is no
world (or whose teacher is gone, on other data than a world's) names `lcm evaluate --lcm` instead of advice that cannot be
followed or a complaint about its checkpoints; an offline hub id for --clip that is not in the cache says so; images
outside [-1, 1] given to the CLIP and FID feature networks are refused, not clamped; a measured ω response that rounds to
zero is printed as 0.00, not -0.00."""

import pytest
import torch

from test_file_inputs import assert_one_line
from test_sweep_world_inputs import no_world, sweep  # noqa: F401 (a fixture)
from tiny_models import write_run

# --- lcm evaluate sweep: runs that are no world's ---------------------------------------------------------------------------

def _own_teacher(folder):
    """A user's own model folder (no world.json) with weights of its own."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"the user's own weights")
    return folder


@pytest.mark.parametrize("adapter, export", [("full", "--lcm {run}/lcm"), ("lora", "--lcm {teacher} --lora {run}/lora")])
def test_sweep_refuses_a_run_of_a_users_own_teacher_naming_lcm_evaluate(adapter, export, tmp_path, run_error, no_world):  # noqa: F811
    """A run of the user's own SD model was told to "give that world as --world", and the model given as --world was then
    refused as no world: the sweep scores a world's runs only, and `lcm evaluate --lcm` scores the run's export."""
    teacher = _own_teacher(tmp_path / "sd")
    run, out = write_run(tmp_path / "run", teacher=str(teacher), data=str(tmp_path / "images"), adapter=adapter), tmp_path / "sweep"
    code, err = run_error(sweep([run], out))
    assert_one_line(code, err, "`lcm evaluate sweep` scores runs distilled from a world's teacher only")
    assert "no world.json" in err and export.format(run=run, teacher=teacher) in err and "give that world" not in err
    assert not out.exists()


def test_sweep_refuses_a_run_whose_teacher_is_gone_on_data_that_is_no_worlds(tmp_path, run_error, no_world):  # noqa: F811
    """A run of a teacher moved since, on the user's own images, was refused as "a checkpoint of another model" once its
    student was built: its teacher cannot have been the world's, whose runs are distilled on world:... data."""
    run = write_run(tmp_path / "run", teacher=str(tmp_path / "moved"), data=str(tmp_path / "images"))
    code, err = run_error(sweep([run], tmp_path / "sweep"))
    assert_one_line(code, err, "`lcm evaluate sweep` scores runs distilled from a world's teacher only")
    assert f"{tmp_path / 'moved'}, which is no folder here" in err and f"--lcm {run}/lcm" in err and "checkpoint" not in err


def test_a_world_run_whose_teacher_moved_or_of_another_world_is_still_told_apart(tmp_path):
    """A world's run (world:... data) whose teacher moved is still swept; a run of another world is told to give it."""
    from latent_consistency.errors import UserError
    from latent_consistency.world.artifact import WORLD_FILE, default_world_path
    from latent_consistency.world.over_training import check_run

    run = write_run(tmp_path / "moved-run", teacher=str(tmp_path / "moved"))
    assert check_run(run, world=default_world_path()).teacher == str(tmp_path / "moved")
    other_world = _own_teacher(tmp_path / "other-world")
    (other_world / WORLD_FILE).write_text("{}")
    with pytest.raises(UserError, match="give that world as --world"):
        check_run(write_run(tmp_path / "other-run", teacher=str(other_world)), world=default_world_path())


# --- --clip HUB_ID offline ----------------------------------------------------------------------------------------------------

def test_an_offline_clip_hub_id_not_in_the_cache_says_so(monkeypatch):
    """Offline, the guide's own `--clip openai/clip-vit-large-patch14` was refused with advice to give "online, a hub id
    such as openai/clip-vit-large-patch14"; as the model loaders do, it says the id is not in the local cache, and how to
    fetch it."""
    from huggingface_hub import constants

    from latent_consistency.errors import UserError
    from latent_consistency.evaluation.clip import ClipModel

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as raised:
        ClipModel.load("someone/clip-not-cached")
    message = str(raised.value)
    assert "not in the local cache (HF_HUB_OFFLINE is set)" in message and "`hf download someone/clip-not-cached`" in message
    assert "give a local folder" in message and "\n" not in message


# --- images outside [-1, 1] -------------------------------------------------------------------------------------------------

def _images(n=8, seed=0):
    """[-1, 1] images with content: dark and light pixels."""
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _stand_in_inception(tmp_path):
    from latent_consistency.evaluation.inception import InceptionFeatures

    class StandIn(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)

    torch.jit.script(StandIn()).save(str(tmp_path / "inception.pt"))
    return InceptionFeatures.load(tmp_path / "inception.pt", size=32)


@pytest.mark.parametrize("convert, hint", [(lambda x: (x + 1) / 2, "x * 2 - 1"), (lambda x: (x + 1) * 127.5, "p / 127.5 - 1")],
                         ids=["[0, 1]", "[0, 255]"])
def test_fid_kid_and_inception_features_refuse_images_outside_minus_one_one(convert, hint, tmp_path):
    """Images in [0, 1] (torchvision's) or [0, 255] were clamped into [-1, 1] by Inception without a word: silently wrong
    scores. (FID and KID of another feature network take what it takes: the known-answer tests feed them features.)"""
    from latent_consistency.errors import UserError
    from latent_consistency.evaluation.fid import fid_score, kid_score

    real, fake, inception = _images(), _images(seed=1), _stand_in_inception(tmp_path)
    assert fid_score(inception, real, fake) >= 0 and inception.features(real).shape == (8, 12)
    for call in (lambda: fid_score(inception, convert(real), fake), lambda: kid_score(inception, real, convert(fake), subsets=2),
                 lambda: inception.features(convert(real))):
        with pytest.raises(UserError, match=r"not in \[-1, 1\]|none below 0") as raised:
            call()
        assert hint in str(raised.value) and "\n" not in str(raised.value)


def test_clip_features_and_score_refuse_images_in_zero_one_and_take_constant_and_overshooting_ones(tmp_path):
    """The CLIP score of [0, 1] images was that of their clamp into [-1, 1]; gray (zeros), white (ones) and a decoder's
    overshoot past 1 by a few tenths are [-1, 1] images still."""
    from latent_consistency.errors import UserError
    from latent_consistency.evaluation.clip import ClipModel
    from tiny_models import save_tiny_clip

    clip = ClipModel.load(str(save_tiny_clip(tmp_path / "clip")))
    images = _images(8)
    with pytest.raises(UserError, match=r"none below 0: they look like images in \[0, 1\], which are x \* 2 - 1"):
        clip.score((images + 1) / 2, ["a red star", "a blue ring"] * 4)
    with pytest.raises(UserError, match=r"p / 127.5 - 1"):
        clip.features((images[:2] + 1) * 127.5)
    # a few pale images (none darker than mid-gray) are [-1, 1] images too: [0, 1] is told only from a batch of 8 or more
    for fine in (torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16), images[:2] * 1.2, (images[:7] + 1) / 2):
        assert clip.features(fine).shape == (len(fine), clip.feature_dim)


# --- the ω response note ----------------------------------------------------------------------------------------------------

def test_an_omega_response_that_rounds_to_zero_is_printed_as_zero():
    """"its ω response was at most -0.00": a small negative response rounds to 0.00."""
    from latent_consistency.guidance_record import GuidanceRecord

    notes = GuidanceRecord(3.0, 15.0, 8.0, {499: -0.004, 999: -0.001}).notes(8.0, given=True)
    assert any("its ω response was at most 0.00 at every t" in note for note in notes) and not any("-0.00" in note for note in notes)
