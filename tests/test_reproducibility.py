"""Seeds as a user relies on them: the image of a (prompt, seed, settings) is the same whatever the entry point, batch or
earlier calls, and the files `lcm generate` writes say which seed and settings reproduce each image."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

CPU = torch.device("cpu")


def generate(model, out, *extra) -> list[str]:
    return ["generate", *extra, "--model", str(model), "--steps", "2", "--guidance-scale", "3", "--out", str(out), "--device", "cpu"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def library_pixels(generator, prompt, seed, steps=2, guidance_scale=3.0) -> np.ndarray:
    from latent_consistency.grids import to_pil

    size = generator.default_size()
    return np.asarray(to_pil(generator([prompt], generator.timesteps(steps), guidance_scale, [seed], size, size))[0], dtype=np.int16)


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)


def test_lcm_lora_with_dropout_in_its_config_gives_one_image_per_seed(tiny_sd, tmp_path):
    """was: an LCM-LoRA whose adapter config has lora_dropout > 0 (diffusers' LCM-LoRA scripts take --lora_dropout and save
    it in the file's metadata) was loaded with peft's new layers in training mode: every call dropped activations at
    random from torch's global generator, so the same seed gave another image each time (0.13 apart in [-1, 1]) and
    `torch.manual_seed` elsewhere decided it. Needs the models.py change of /tmp/helper-repro-extra.patch (eval mode)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from latent_consistency.pipelines import LCMGenerator

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.3, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=metadata, safe_serialization=True)
    generator = LCMGenerator.load(str(tiny_sd), CPU, torch.float32, lora=str(tmp_path / "lora"))
    size, timesteps = generator.default_size(), generator.timesteps(2)
    first = generator(["a red star"], timesteps, 1.0, [3], size, size)
    torch.manual_seed(123)  # what else the process draws from the global generator must not matter
    again = generator(["a red star"], timesteps, 1.0, [3], size, size)
    assert torch.equal(first, again)
    assert not any(m.training for m in generator.model.unet.modules() if "dropout" in type(m).__name__.lower())


def test_generate_takes_the_largest_seed_the_api_and_the_server_take(generator, tiny_lcm, tmp_path, run_error):
    """was: `lcm generate --seed 9223372036854775807` (2^63 - 1, one image) was refused ("must stay below 2^63", which it
    is), though `LCMGenerator` and `lcm serve` take that seed: a server's image of that seed could not be made again on
    the command line. The last image's seed SEED+n-1 may be 2^63 - 1; one more is still refused."""
    from latent_consistency.pipelines import MAX_SEED

    out = tmp_path / "images"
    code, err = run_error(generate(tiny_lcm, out, "a red star", "--seed", str(MAX_SEED)))
    assert code == 0, err
    np.testing.assert_array_equal(pixels(out / "0000-a-red-star.png"), library_pixels(generator, "a red star", MAX_SEED))
    code, err = run_error(generate(tiny_lcm, tmp_path / "more", "a red star", "a blue ring", "--seed", str(MAX_SEED)))
    assert code == 2 and len(err.splitlines()) == 1 and "too large" in err and f"at most {MAX_SEED - 1}" in err, err
    assert not (tmp_path / "more").exists()


def test_each_png_records_the_seed_and_settings_that_make_it_again(tiny_lcm, tmp_path, run_error):
    """was: the PNGs of `lcm generate` recorded nothing (a name like 0002-a-green-square.png): which seed made an image
    (SEED+2, of a --seed given to the run) was lost with the command line. Now each records its prompt, seed and
    settings; `lcm generate PROMPT --seed S` with them alone makes the same pixels as its batch did."""
    from latent_consistency.cli.generate import RECORD_KEY

    prompts = ["a red star", "a blue ring", "a green square"]
    batch = tmp_path / "batch"
    code, err = run_error(generate(tiny_lcm, batch, *prompts, "--seed", "5", "--batch-size", "2", "--gamma", "0.3"))
    assert code == 0, err
    files = sorted(batch.iterdir())
    records = [json.loads(Image.open(f).text[RECORD_KEY]) for f in files]
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, 5 + i) for i, p in enumerate(prompts)]
    assert records[2]["guidance_scale"] == 3.0 and records[2]["gamma"] == 0.3 and records[2]["sampler"] == "lcm"
    record = records[2]
    alone = tmp_path / "alone"
    argv = ["generate", record["prompt"], "--seed", str(record["seed"]), "--model", record["model"], "--timesteps",
            ",".join(map(str, record["timesteps"])), "--guidance-scale", str(record["guidance_scale"]), "--gamma", str(record["gamma"]),
            "--height", str(record["height"]), "--width", str(record["width"]), "--out", str(alone), "--device", "cpu"]
    assert run_error(argv)[0] == 0
    np.testing.assert_array_equal(pixels(alone / "0000-a-green-square.png"), pixels(files[2]))


def test_skip_existing_refuses_an_image_of_another_seed_or_settings(tiny_lcm, tmp_path, run_error):
    """was: a killed run resumed with --skip-existing but another --seed (or steps, guidance scale, model ...) kept the
    earlier images and made the rest with the new settings: a folder of two runs' images, silently, and no file said
    which was which. Now a kept image must carry this run's record (prompt, seed, settings); one that does not, or has
    none, is refused in one line (exit 2) and nothing is written."""
    prompts = ["a red star", "a blue ring"]
    out = tmp_path / "images"
    assert run_error(generate(tiny_lcm, out, prompts[0], "--seed", "5"))[0] == 0  # a killed run of two prompts left image 0
    kept = (out / "0000-a-red-star.png").read_bytes()
    for extra, named in ((["--seed", "6"], "seed 5"), (["--seed", "5", "--height", "24"], "height 16")):
        code, err = run_error(generate(tiny_lcm, out, *prompts, "--skip-existing", *extra))
        assert code == 2 and len(err.splitlines()) == 1 and named in err, err
        assert sorted(p.name for p in out.iterdir()) == ["0000-a-red-star.png"]
    code, err = run_error(generate(tiny_lcm, out, *prompts, "--skip-existing", "--seed", "5"))
    assert code == 0, err
    assert (out / "0000-a-red-star.png").read_bytes() == kept and (out / "0001-a-blue-ring.png").is_file()
    Image.new("RGB", (16, 16)).save(out / "0001-a-blue-ring.png")  # an image of unknown origin
    code, err = run_error(generate(tiny_lcm, out, *prompts, "--skip-existing", "--seed", "5"))
    assert code == 2 and len(err.splitlines()) == 1 and "no record" in err, err


# The page's script run in node with a stand-in for the few DOM elements and `fetch` it uses: what its requests send.
PAGE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.slice(html.indexOf("<script>") + "<script>".length, html.indexOf("</script>"));
const elements = {};
const element = (id) => elements[id] ??= { value: "", checked: false, disabled: false, textContent: "", className: "", src: "",
                                           validity: { badInput: false }, addEventListener() {}, focus() {} };
const sent = [];
const fetch = (url, options) => {
  if (!options) return new Promise(() => {});  // /v1/config: never answers
  sent.push(options.body);
  return Promise.reject(Object.assign(new Error("aborted"), { name: "AbortError" }));
};
const document = { getElementById: element, activeElement: null };
const location = { pathname: "/" };  // the page served at the root
const context = vm.createContext({ document, fetch, location, setTimeout, clearTimeout, performance,
                                   AbortController, URL, console });
vm.runInContext(script, context);
(async () => {
  const out = [];
  for (const [seed, lock, focused] of JSON.parse(process.argv[3])) {
    Object.assign(element("prompt"), { value: "a red star" });
    Object.assign(element("steps"), { value: "2" });
    Object.assign(element("seed"), { value: seed });
    Object.assign(element("lock"), { checked: lock });
    document.activeElement = focused ? element("seed") : null;
    sent.length = 0;
    await context.generate();
    out.push({ sent: sent.length ? sent[0] : null, box: element("seed").value, status: element("status").textContent });
  }
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_page_sends_the_seed_its_box_shows(tmp_path):
    """was: the page sent `+box.value`, a JavaScript number: a locked seed above 2^53 went out rounded (9007199254740993 as
    ...992, which X-Seed then named, while the box still showed ...993, the seed a user would note down), and a blank box
    sent seed 0. Now the box's digits go out as typed; a blank box gets a new seed written into it, as unlocked does, but
    not while it has the focus and is locked (the user is typing a seed: the new one would have their digits appended);
    a box that holds no seed is said so, and nothing is sent."""
    from importlib import resources

    page = tmp_path / "page.html"
    page.write_text(resources.files("latent_consistency.serve").joinpath("page.html").read_text(encoding="utf-8"), encoding="utf-8")
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_HARNESS)
    cases = [["9007199254740993", True], ["9223372036854775807", True], ["", True], ["", False], ["1.5", True], ["12", True],
             ["", True, True], ["", False, True]]
    run = subprocess.run(["node", str(harness), str(page), json.dumps(cases)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    big, largest, blank, unlocked, fraction, plain, typing, typing_unlocked = json.loads(run.stdout)
    assert json.loads(big["sent"])["seed"] == 9007199254740993
    assert json.loads(largest["sent"])["seed"] == 2**63 - 1
    for drawn in (blank, unlocked, typing_unlocked):
        assert drawn["box"] != "" and json.loads(drawn["sent"])["seed"] == int(drawn["box"])
    assert fraction["sent"] is None and "seed must be a whole number" in fraction["status"]
    # /v1/config has not answered (the stand-in never does): no guidance scale, the server's default
    assert json.loads(plain["sent"]) == {"prompt": "a red star", "steps": 2, "seed": 12}
    assert typing["sent"] is None and typing["box"] == "" and "Type a seed" in typing["status"]
