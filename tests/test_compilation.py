"""`Generator.compile` (`lcm generate --compile`, `lcm serve --compile`): the compiled fast path draws the plain path's
images within its dtype's tolerance, and the compiled modules are the ones a sampling call runs."""

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.compilation import sampling_modules
from latent_consistency.pipelines import LCMGenerator

PROMPTS = ["a red star", "a blue ring"]


@pytest.mark.slow
def test_serve_warm_up_compiles_a_bfloat16_generator_that_draws_the_plain_images(tiny_lcm, capsys):
    """inductor's code generation, once (a minute of gcc on a 2-core CPU): `lcm serve --compile`'s warm-up of a bfloat16
    generator, the path that freezes the weights into the graph. The compiled modules are the ones a call runs, and its
    images are the plain path's within bfloat16's tolerance, at the warm-up's shape and with other timesteps."""
    from latent_consistency.cli.serve import warm_up

    dtype, tolerance = torch.bfloat16, 0.1
    plain = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), dtype)
    served = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), dtype)
    warm_up(served)
    assert "compiled in" in capsys.readouterr().out
    assert all(module._compiled_call_impl is not None for module in sampling_modules(served.model).values())
    assert not any(module._compiled_call_impl is not None for module in sampling_modules(plain.model).values())
    size = served.default_size()
    for steps in (1, 4):  # the warm-up's request, then one of other timesteps (inputs to the same graph)
        request = (["a red star"], served.timesteps(steps), 8.0, [7], size, size)
        expected, got = plain(*request).float(), served(*request).float()
        assert got.shape == expected.shape == (1, 3, size, size)
        assert (got - expected).abs().max() < tolerance
        # bfloat16's tolerance is loose per pixel; on average the two paths agree far more closely
        assert (got - expected).abs().mean() < tolerance / 10
        assert torch.equal(served(*request).float(), got)  # a second call draws the same images


@pytest.mark.slow
def test_generate_cli_compile_writes_the_plain_images(tiny_lcm, tmp_path, traced_not_built):
    """`lcm generate --compile` in float32: compiled as `Generator.compile` compiles (inductor, asked for each of the three
    modules; traced, not built: `traced_not_built`), its images are the plain command's."""
    import numpy as np
    from PIL import Image

    common = ["generate", *PROMPTS, "--model", str(tiny_lcm), "--steps", "2", "--seed", "3"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert traced_not_built == []
    assert main(common + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    assert traced_not_built == ["inductor"] * 3  # the text encoder, the network and the decoder
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "compiled").iterdir()) and len(names) == 2
    for name in names:
        a = np.asarray(Image.open(tmp_path / "plain" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "compiled" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of images equal within 1e-4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def lcd_loss_and_gradients(model, student_unet, target_unet, compiled: bool):
    """One LCD loss (Algorithm 1, DDIM) of a student of `model` and its gradients, with `Student.compile`'s modules
    compiled or not; the same data, noise, n and ω draws every time."""
    from latent_consistency.losses import LCDLoss
    from latent_consistency.models import consistency_model, lcm_scheduler_config
    from latent_consistency.solvers import get_solver
    from latent_consistency.training.students import Student

    scheduler_config = lcm_scheduler_config(model.scheduler_config, 20, model.prediction_type)
    if compiled:
        Student(student_unet, target_unet, True, "full", scheduler_config).compile(student_unet, model.unet)
    loss_fn = LCDLoss(schedule=model.schedule, skip=20, guidance_scale_range=(1.0, 4.0), distance="l2", weighting="uniform",
                      teacher=model.guided_teacher(), solver=get_solver("ddim"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = model.prompts.encode(PROMPTS)
    loss = loss_fn(consistency_model(student_unet, scheduler_config), consistency_model(target_unet, scheduler_config), latents, cond,
                   model.prompts.uncond().expand(2, -1, -1), torch.Generator().manual_seed(2)).mean()
    student_unet.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in student_unet.named_parameters()}


@pytest.fixture
def traced_not_built(monkeypatch):
    """`nn.Module.compile` with the backend asked for recorded and AOT autograd's eager backend run in its place: dynamo
    traces the module and AOT autograd builds its forward and backward graphs as inductor's do, without generating C++
    (inductor's kernels for a training step take about two minutes of gcc on a 2-core CPU; inductor's code generation is
    checked once, for bfloat16 sampling above). Returns the backends asked for."""
    compile_module, asked = torch.nn.Module.compile, []

    def compile_traced(module, *args, backend="inductor", **kwargs):
        asked.append(backend)
        compile_module(module, *args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_traced)
    return asked


@pytest.mark.slow
def test_compiled_student_target_and_teacher_give_the_plain_loss_and_gradients(tiny_sd, traced_not_built):
    """`lcm distill --compile` (`Student.compile`: student, EMA target and teacher) changes how they run, not what they
    compute: one LCD step's loss and every gradient equal the plain ones, through the graphs that dynamo and AOT autograd
    make of the three networks (`traced_not_built`)."""
    import copy

    from latent_consistency.models import load_diffusion_model, make_student_unet

    model = load_diffusion_model(str(tiny_sd))
    torch.manual_seed(0)
    student = make_student_unet(model.unet, 32).requires_grad_(True).train()
    target = copy.deepcopy(student).requires_grad_(False).eval()
    plain_loss, plain = lcd_loss_and_gradients(model, student, target, compiled=False)
    loss, gradients = lcd_loss_and_gradients(model, student, target, compiled=True)
    assert student._compiled_call_impl is not None and target._compiled_call_impl is not None and model.unet._compiled_call_impl is not None
    assert traced_not_built == ["inductor"] * 3  # what `lcm distill --compile` asks for
    assert torch.isclose(loss, plain_loss, rtol=1e-5) and plain_loss > 0
    # float32 rounding through the network and back, relative to each tensor's gradient and, for those that are zero up to
    # rounding (a convolution's bias before a group norm), to the whole gradient's size
    total = torch.stack([grad.norm() for grad in plain.values()]).norm()
    for name, grad in plain.items():
        assert (gradients[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-6 * total, name


def test_distill_compile_compiles_the_run_s_networks_and_lora_is_refused(tiny_sd, image_folder, tmp_path, monkeypatch, run_error):
    """The loop's wiring of `--compile` (the compiling itself is checked above): a full run calls `Student.compile` with its
    student and teacher; a LoRA student is refused before anything is written."""
    from latent_consistency.training.students import Student

    calls = []
    monkeypatch.setattr(Student, "compile", lambda self, unet, teacher=None: calls.append((unet, teacher)))
    out = tmp_path / "run"
    common = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder), "--steps", "1",
              "--omega-response-samples", "0"]
    assert main(common + ["--out", str(out), "--compile"]) == 0
    assert len(calls) == 1 and isinstance(calls[0][0], torch.nn.Module) and isinstance(calls[0][1], torch.nn.Module)
    assert calls[0][0] is not calls[0][1]  # the student, then the teacher
    code, err = run_error(common + ["--out", str(tmp_path / "lora"), "--adapter", "lora", "--compile"])
    assert code == 2 and "--compile applies to full students" in err.splitlines()[-1]
    assert not (tmp_path / "lora").exists()


@pytest.fixture
def no_cxx(monkeypatch):
    """A machine without a C++ compiler, as inductor searches for one (its `cpp.cxx` setting; the search is cached)."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search

    monkeypatch.setattr(config.cpp, "cxx", ("no-such-c++-compiler",))
    cpp_compiler_search.cache_clear()
    yield
    cpp_compiler_search.cache_clear()


def test_compile_on_a_cpu_without_a_cxx_compiler_is_one_line_before_any_work(no_cxx, tiny_lcm, tiny_sd, image_folder, tmp_path, run_error):
    """Inductor builds CPU kernels with a C++ compiler: without one, the first compiled call failed with a long traceback
    (after the model loaded, and for training after the run folder was made)."""
    for argv, out in ((["generate", "a red star", "--model", str(tiny_lcm), "--compile"], tmp_path / "images"),
                      (["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder), "--compile"], tmp_path / "run")):
        code, err = run_error([*argv, "--out", str(out)])
        assert code == 2 and len(err.splitlines()) == 1 and "needs a C++ compiler" in err, err
        assert not out.exists()
