"""The held-out data's scan in a multi-process run: every process reads --eval-data whole (as rank 0 of 1), and the first
alone logs what its scan skipped. was: logged once per process, as the training data's scan had been (8 times on 8 GPUs)."""

from latent_consistency.models import load_diffusion_model
from latent_consistency.training.config import DistillConfig
from latent_consistency.training.loop import training_and_eval_batches
from test_generate_names_and_listing import folder_with_an_uncaptioned_image, logged


def test_only_the_first_process_logs_the_held_out_folders_scan(tiny_sd, tmp_path):
    data, held_out = (folder_with_an_uncaptioned_image(tmp_path / name) for name in ("data", "held-out"))
    config = DistillConfig(teacher=str(tiny_sd), data=str(data), eval_data=str(held_out), out=str(tmp_path / "run"))
    base = load_diffusion_model(str(tiny_sd))
    folders = {}
    for rank in (0, 1):
        with logged() as lines:
            batches, eval_batches = training_and_eval_batches(config, base, 2, rank, 2, "cpu")
        folders[rank] = [line.split(": ")[0] for line in lines]
        assert eval_batches.dataset.skipped.counts == {"no_caption": 1}  # counted on every process
    assert folders == {0: [f"image folder {data}", f"image folder {held_out}"], 1: []}
