"""A library review's findings: a PNG whose image data holds fewer rows than its header says is refused, not read with
black rows; a Python call's errors name its arguments (device=, dtype=, out_dir), not a command's flags; and a sampler's
ω is checked with its starting noise."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from latent_consistency.data.images import UndecodableImage, _to_rgb8, decode_rgb, open_rgb8

# --- 1. a PNG short of rows ---

# Adam7's passes: (first row, first column, row step, column step)
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def png_file(pixels: np.ndarray, interlaced: bool = False, rows: int | None = None) -> bytes:
    """An 8-bit PNG of `pixels` ([H, W, C], C = 1 to 4) as a writer that needs no Pillow writes it, every chunk and CRC
    valid and the zlib stream complete; `rows`: only the first that many scanlines (counted over all Adam7 passes when
    interlaced), a buggy writer's file."""
    height, width, channels = pixels.shape
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    scanlines = [b"\0" + row.tobytes() for r0, c0, dr, dc in passes for row in pixels[r0::dr, c0::dc] if row.size]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, int(interlaced))
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in ((b"IHDR", header), (b"IDAT", zlib.compress(b"".join(scanlines[:rows]))), (b"IEND", b"")))


PIXELS = np.random.default_rng(0).integers(1, 256, (24, 20, 3), dtype=np.uint8)
SHORT = {  # scanlines kept: non-interlaced 24 rows; interlaced 3+3+3+6+6+12+12 = 45 over the passes
    "half the rows": (False, 12),
    "all but the last row": (False, 23),
    "interlaced, no last pass": (True, 33),
    "interlaced, all but the last row": (True, 44),
    "interlaced, half the first pass": (True, 1),
}


@pytest.mark.parametrize("interlaced", [False, True])
def test_the_test_writer_writes_whole_pngs_pillow_reads(interlaced):
    image, reason = open_rgb8(png_file(PIXELS, interlaced))
    assert reason is None and np.array_equal(np.asarray(image), PIXELS)


@pytest.mark.parametrize("case", SHORT)
def test_a_png_short_of_rows_is_refused_not_read_with_black_rows(case, tmp_path):
    """Pillow's decoder stops without an error where the zlib stream ends, leaving the rows it never reached black."""
    interlaced, rows = SHORT[case]
    data = png_file(PIXELS, interlaced, rows)
    (tmp_path / "short.png").write_bytes(data)
    with Image.open(io.BytesIO(data)) as plain:
        plain.load()  # what open_rgb8 did: no error
    for source in (data, tmp_path / "short.png"):
        with pytest.raises(UndecodableImage, match=r"image data ends before its last row \(its header says 24\)"):
            open_rgb8(source)
    assert decode_rgb(data, 8) == (None, "corrupt")  # a training sample skipped as corrupt


def test_a_one_row_interlaced_png_short_of_its_last_pass_is_refused():
    """A one-row image's row is written in parts by four of Adam7's passes (scanlines of 3, 2, 5 and 10 of 20 pixels)."""
    row = GRAY[:1, :, None]
    assert np.array_equal(np.asarray(open_rgb8(png_file(row, interlaced=True, rows=4))[0])[..., 0], row[..., 0])
    with pytest.raises(UndecodableImage, match=r"image data ends before its last row \(its header says 1\)"):
        open_rgb8(png_file(row, interlaced=True, rows=3))


def test_a_short_init_image_is_refused_in_one_line(tmp_path):
    from latent_consistency.cli.generate import read_init_image
    from latent_consistency.errors import UserError

    (tmp_path / "short.png").write_bytes(png_file(PIXELS, rows=12))
    with pytest.raises(UserError, match=r"cannot read init image .*short\.png: a PNG whose image data ends") as refused:
        read_init_image(str(tmp_path / "short.png"), 16, 16, 8)
    assert "\n" not in str(refused.value)


def pillow_png(image: Image.Image, **options) -> bytes:
    data = io.BytesIO()
    image.save(data, "PNG", **options)
    return data.getvalue()


GRAY = np.random.default_rng(1).integers(0, 256, (24, 20), dtype=np.uint8)
WHOLE = {  # a PNG of each kind, and ones whose last row is the colour open_rgb8 fills the pixel memory with first
    "8-bit RGB": lambda: pillow_png(Image.fromarray(PIXELS)),
    "16-bit gray": lambda: pillow_png(Image.fromarray(GRAY.astype(np.uint16) * 257)),
    "palette": lambda: pillow_png(Image.fromarray(PIXELS).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
    "palette, 4 bits": lambda: pillow_png(Image.fromarray(PIXELS).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
                                          bits=4),
    "gray with alpha": lambda: pillow_png(Image.fromarray(np.stack([GRAY, 255 - GRAY], -1), "LA")),
    "1-bit": lambda: pillow_png(Image.fromarray(GRAY).convert("1")),
    "RGBA": lambda: pillow_png(Image.fromarray(np.dstack([PIXELS, GRAY]))),
    "animated (its first frame)": lambda: pillow_png(Image.fromarray(PIXELS), save_all=True, append_images=[Image.fromarray(~PIXELS)]),
    "interlaced RGB": lambda: png_file(PIXELS, interlaced=True),
    "interlaced gray, one row": lambda: png_file(GRAY[:1, :, None], interlaced=True),
    "interlaced gray, two rows": lambda: png_file(GRAY[:2, :, None], interlaced=True),
    "last row of the fill colour": lambda: png_file(np.concatenate([PIXELS[:-1], np.full((1, 20, 3), (90, 127, 164), np.uint8)])),
    "interlaced, last odd row of the fill": lambda: png_file(np.concatenate([PIXELS[:-2], np.full((2, 20, 3), (90, 127, 164),
                                                                                                    np.uint8)]), interlaced=True),
    "all the fill colour, gray": lambda: png_file(np.full((24, 20, 1), 90, np.uint8)),
}


@pytest.mark.parametrize("case", WHOLE)
def test_whole_pngs_of_every_kind_are_still_read(case):
    data = WHOLE[case]()
    with Image.open(io.BytesIO(data)) as plain:
        plain.load()
        expected, expected_reason = _to_rgb8(plain)
    image, reason = open_rgb8(data)
    assert reason == expected_reason and np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize(("case", "decodes"), [("8-bit RGB", 1), ("interlaced RGB", 1), ("16-bit gray", 1), ("palette", 1),
                                               ("last row of the fill colour", 2), ("interlaced gray, one row", 2)])
def test_a_whole_png_is_decoded_once_unless_its_last_row_is_the_fill(case, decodes, monkeypatch):
    """The check costs a fill of the pixel memory; only a last row of exactly the fill colour decodes the file again."""
    from latent_consistency.data import images

    opened = []
    monkeypatch.setattr(images, "_opened", lambda source, open=images._opened: opened.append(source) or open(source))
    open_rgb8(WHOLE[case]())
    assert len(opened) == decodes


# --- 2. a Python call's errors name its arguments, a command's its flags ---

@pytest.fixture
def no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("cls", ["LCMGenerator", "SolverGenerator"])
def test_a_load_names_device_and_dtype_as_its_arguments(cls, no_gpu, tmp_path):
    from latent_consistency import pipelines
    from latent_consistency.errors import UserError

    load = getattr(pipelines, cls).load
    with pytest.raises(UserError, match=r"^device='cuda:1' was asked for but no CUDA GPU is available; use device='cpu'$"):
        load(str(tmp_path / "model"), device="cuda:1")
    with pytest.raises(UserError, match=r"float16 on the CPU is refused: .*; use dtype='float32', or bfloat16") as refused:
        load(str(tmp_path / "model"), dtype="float16")
    assert "--" not in str(refused.value)


def test_the_commands_name_device_and_dtype_as_their_flags(no_gpu, tmp_path, run_error):
    from command_helpers import refused

    for argv in (["generate", "a", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"],
                 ["serve", "--model", str(tmp_path), "--device", "cuda"]):
        refused(run_error, argv, "--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    refused(run_error, ["generate", "a", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "float16"],
            "use --dtype float32, or bfloat16 (fast where the CPU has bfloat16 instructions)")


def test_solver_generator_load_sends_an_lcm_to_lcm_generator(tiny_lcm):
    from latent_consistency.errors import UserError
    from latent_consistency.pipelines import SolverGenerator

    with pytest.raises(UserError, match=r"is an LCM: sample it with LCMGenerator\.load$"):
        SolverGenerator.load(str(tiny_lcm))
    with pytest.raises(UserError, match=r"is an LCM: sample it with --sampler lcm$"):  # as `lcm generate --sampler ddim` passes it
        SolverGenerator.load(str(tiny_lcm), sampler="dpm", sampler_flag="--sampler")


def test_an_output_folder_is_named_as_the_caller_gave_it(tmp_path):
    from latent_consistency.errors import UserError
    from latent_consistency.outputs import partial_folder

    long = tmp_path / ("x" * 250)
    (tmp_path / "gone").symlink_to(tmp_path / "nothing")
    for flag, name in (("--out", "OUT"), ("out_dir", "OUT_DIR")):
        with pytest.raises(UserError, match=rf"^{flag} '\.\.' names no new folder; give the folder by its name \(e\.g\. runs/latents\)$"):
            partial_folder("..", "runs/latents", flag)
        with pytest.raises(UserError, match=rf"^{flag} .*gone is a symbolic link to .*nothing, which does not exist"):
            partial_folder(tmp_path / "gone", "runs/latents", flag)
        with pytest.raises(UserError, match=rf"^{flag} .*: its folder name is 250 bytes long; at most 247 \({name}\.partial is written first\)$"):
            partial_folder(long, "runs/latents", flag)
    with pytest.raises(UserError, match=r"^--out '\.\.' names no new folder"):  # a command's, by default
        partial_folder("..", "runs/latents")


# --- 3. ω checked with the starting noise ---

@pytest.fixture(scope="module")
def lcm_inputs(tiny_lcm):
    """An LCM's consistency function, two rows of starting noise, their condition and one timestep's grid."""
    import torch

    from latent_consistency.models import load_lcm

    model = load_lcm(str(tiny_lcm))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, model.consistency_model(), z, model.prompts.encode(["a red star", "a blue ring"]), model.timesteps(2)


def sample(sampler, f, model, z, cond, timesteps, omega):
    from latent_consistency.sampling import sample_lcm, sample_tcd

    if sampler == "lcm":
        return sample_lcm(f, z, timesteps, cond, omega, model.schedule, torch_generator())
    return sample_tcd(f, z, timesteps, cond, omega, model.schedule, 0.3, torch_generator())


def torch_generator():
    import torch

    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
@pytest.mark.parametrize(("omega", "message"), [
    ("three values", r"omega must be one number or one per latent \(2\), got shape \[3\]: row i is guided with omega\[i\]$"),
    ("no values", r"omega must be one number or one per latent \(2\), got shape \[0\]"),
    ("NaN", r"omega holds NaN or infinity: ω = g - 1 must be a finite number$"),
    ("infinite row", r"omega holds NaN or infinity"),
    ("text", r"omega must be a number \(ω = g - 1, g the guidance scale\) or a tensor of them, got '3'$"),
    ("booleans", r"omega must be a number .* got tensor\(\[ True, False\]\)$"),
])
def test_an_omega_the_network_cannot_take_is_refused_in_one_line(sampler, omega, message, lcm_inputs):
    import torch

    from latent_consistency.errors import UserError

    model, f, z, cond, timesteps = lcm_inputs
    value = {"three values": torch.tensor([1.0, 2.0, 3.0]), "no values": torch.tensor([]), "NaN": float("nan"),
             "infinite row": torch.tensor([1.0, float("inf")]), "text": "3", "booleans": torch.tensor([True, False])}[omega]
    with pytest.raises(UserError, match=message):
        sample(sampler, f, model, z, cond, timesteps, value)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_omega_as_one_value_or_one_per_row_in_any_shape_is_taken(sampler, lcm_inputs):
    import torch

    model, f, z, cond, timesteps = lcm_inputs
    per_row = sample(sampler, f, model, z, cond, timesteps, torch.tensor([3.0, 3.0]))
    for omega in (3.0, 3, torch.tensor(3.0), torch.tensor([3.0]), torch.tensor([[3.0], [3.0]]), [3.0, 3.0], torch.tensor([3, 3])):
        torch.testing.assert_close(sample(sampler, f, model, z, cond, timesteps, omega), per_row)


def test_one_omega_in_a_tensor_serves_every_row_under_a_negative_prompt(lcm_inputs):
    """NegativePromptGuidance doubled a one-value ω tensor as it doubles one per row: 2 values for 4 rows, torch's error."""
    import torch

    from latent_consistency.denoisers import NegativePromptGuidance

    model, f, z, cond, timesteps = lcm_inputs
    guided = NegativePromptGuidance(f, model.prompts.encode(["blurry"]), 0.5)
    torch.testing.assert_close(sample("lcm", guided, model, z, cond, timesteps, torch.tensor([3.0])),
                               sample("lcm", guided, model, z, cond, timesteps, 3.0))


# --- 4. the callers outside the reviewed modules: `lcm generate` keeps its flag, a latent cache names its argument ---

def test_lcm_generate_sends_an_lcm_to_its_sampler_flag(tiny_lcm, tmp_path, run_error):
    from command_helpers import refused

    refused(run_error, ["generate", "a", "--model", str(tiny_lcm), "--sampler", "ddim", "--out", str(tmp_path / "o")],
            "is an LCM: sample it with --sampler lcm")


def test_a_latent_cache_from_python_names_its_out_dir(tiny_sd, tmp_path):
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import write_latent_cache
    from latent_consistency.errors import UserError
    from latent_consistency.models import load_diffusion_model
    from tiny_models import write_captioned_images

    model = load_diffusion_model(str(tiny_sd))
    images = ImageFolderDataset(write_captioned_images(tmp_path / "images", 2), 16)
    (tmp_path / "gone").symlink_to(tmp_path / "nothing")
    with pytest.raises(UserError, match=r"^out_dir .*gone is a symbolic link to .*nothing, which does not exist"):
        write_latent_cache(images, tmp_path / "gone", model.codec, model.prompts, source={}, progress=False)
