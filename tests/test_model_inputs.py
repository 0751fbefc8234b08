"""Model folders and LoRAs a user gives the commands: a folder with a component missing, empty or broken, a config of the
wrong kind, weights that do not fit their config, a hub id that cannot be had offline, a LoRA of another model. Each is
one line on stderr and exit code 2, before any output is written (`models.load_diffusion_model`, `models.load_lcm_lora`)."""

import json
import shutil
import socket

import pytest


def assert_refused(code, err, out, *words):
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists(), "an output was written before the error"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 4)


def _write_json(path, value):
    path.write_text(json.dumps(value))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:4000])


def _unet_config_class(folder, name):
    config = json.loads((folder / "unet" / "config.json").read_text())
    _write_json(folder / "unet" / "config.json", config | {"_class_name": name})


def _t5_text_encoder(folder):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4).save_pretrained(folder / "text_encoder")


# What is done to a copy of a model folder, and a word the one-line message must hold
BROKEN = {
    "no tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), "tokenizer/ folder"),
    "empty tokenizer": (lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()], "is empty"),
    "empty vae": (lambda f: [p.unlink() for p in (f / "vae").iterdir()], "vae/ folder"),
    "truncated text encoder weights": (lambda f: _truncate(f / "text_encoder" / "model.safetensors"), "text_encoder of"),
    "text encoder config a JSON list": (lambda f: _write_json(f / "text_encoder" / "config.json", [1, 2]), "JSON list"),
    "unet config a JSON list": (lambda f: _write_json(f / "unet" / "config.json", [1, 2]), "unet/config.json holds a JSON list"),
    "model_index.json a JSON list": (lambda f: _write_json(f / "model_index.json", [1]), "model_index.json holds a JSON list"),
    "unet config of another class": (lambda f: _unet_config_class(f, "AutoencoderKL"), "names the class AutoencoderKL"),
    "vae in place of the unet": (lambda f: (shutil.rmtree(f / "unet"), shutil.copytree(f / "vae", f / "unet")), "AutoencoderKL"),
    "text encoder config of a T5": (_t5_text_encoder, "t5"),
}


def broken_copy(model, tmp_path, case):
    folder = shutil.copytree(model, tmp_path / "broken")
    BROKEN[case][0](folder)
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_generate_refuses_a_broken_lcm_folder(case, tiny_lcm, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(broken_copy(tiny_lcm, tmp_path, case)), "--out", str(out)])
    assert_refused(code, err, out, BROKEN[case][1])


def test_weights_without_a_layer_of_their_config(tiny_sd, tiny_lcm, tmp_path, run_error):
    """An LCM's unet/config.json (an ω input) over a teacher's weights (none): refused, not left on the meta device."""
    folder = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    shutil.copy(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(folder), "--out", str(out)])
    assert_refused(code, err, out, "time_embedding.cond_proj.weight", "different models")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Without tokenizer/, transformers makes an empty tokenizer that fails (a traceback) only when the first prompt is encoded,
# after the output folder is made; `lcm serve` would start serving. Its case is one that failed at once (a traceback).
COMMAND_CASES = {"distill": "no tokenizer", "finetune": "no tokenizer", "evaluate": "no tokenizer", "serve": "truncated text encoder weights"}


@pytest.mark.parametrize("command", sorted(COMMAND_CASES))
def test_every_command_refuses_a_broken_model_folder(command, tiny_sd, tiny_lcm, images, tmp_path, run_error):
    case = COMMAND_CASES[command]
    model = broken_copy(tiny_sd if command == "distill" else tiny_lcm, tmp_path, case)
    out = tmp_path / "out"
    argv = {
        "distill": ["distill", "--preset", "tiny", "--teacher", str(model), "--data", str(images), "--out", str(out)],
        "finetune": ["finetune", "--preset", "tiny", "--model", str(model), "--data", str(images), "--out", str(out)],
        "evaluate": ["evaluate", "--lcm", str(model), "--prompts", str(images), "--steps", "1", "--out", str(out)],
        "serve": ["serve", "--model", str(model), "--port", str(free_port())],
    }[command]
    code, err = run_error(argv)
    assert_refused(code, err, out, BROKEN[case][1])


def test_student_init_without_a_layer_of_its_config(tiny_sd, tiny_lcm, images, tmp_path, run_error):
    folder = shutil.copytree(tiny_lcm, tmp_path / "init")
    shutil.copy(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet")
    out = tmp_path / "out"
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--student-init", str(folder), "--time-cond-proj-dim", "32",
                     "--data", str(images), "--out", str(out)])
    assert_refused(code, err, out, "time_embedding.cond_proj.weight")


@pytest.mark.parametrize("name", ["someone/model", "runs/lcm"])
def test_a_hub_id_offline_is_one_line_at_once(name, tmp_path, run_error, monkeypatch):
    """Offline, a hub id (or a mistyped relative path, which looks like one) that is not in the cache: say so, without the
    hub client's own message and warnings."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", name, "--out", str(out)])
    assert_refused(code, err, out, name, "not in the local cache")


def test_a_lora_hub_id_offline(tiny_sd, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", "someone/lcm-lora", "--out", str(out)])
    assert_refused(code, err, out, "someone/lcm-lora", "not in the local cache")


@pytest.mark.parametrize("content", ["not json", "[1]"])
def test_a_lora_with_a_broken_scheduler_config(content, tiny_sd, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    (lora / "scheduler_config.json").write_text(content)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "scheduler_config.json")


@pytest.mark.parametrize("direction", ["sdxl lora on sd", "sd lora on sdxl"])
def test_a_lora_of_another_architecture(direction, tiny_sd, tiny_sdxl, tmp_path, capfd):
    """Its layers' shapes do not fit: one line that says so (diffusers' own log of the failure, a line per layer, is off)."""
    from tiny_models import save_tiny_lora

    model, other = (tiny_sd, tiny_sdxl) if direction == "sdxl lora on sd" else (tiny_sdxl, tiny_sd)
    lora = save_tiny_lora(tmp_path / "lora", other)
    out = tmp_path / "out"
    from latent_consistency.cli import main

    code = main(["generate", "a", "--model", str(model), "--lora", str(lora), "--out", str(out)])
    err = capfd.readouterr().err.strip()  # at the file descriptor: diffusers' logging handler holds the stderr of its import
    assert_refused(code, err, out, "does not fit", "another model family")
