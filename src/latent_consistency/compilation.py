"""`torch.compile` for sampling: a text-to-image model's text encoder, denoising network and image decoder, compiled in place.

A few-step sampler spends its time in the network's forward (1-8 calls), one decode and one text encoding. Inductor removes the
per-operator Python and dispatch overhead, which is most of a small batch's time, and fuses the elementwise work between
the convolutions and matmuls. In reduced precision (bfloat16, float16) it also freezes the weights into the graph
(inductor's `freezing`: constant folding and weight prepacking), which is what makes bfloat16 convolutions fast on a CPU
with AVX512-BF16. Measured on a 2-core CPU with the world's LCM, 4 steps, against diffusers' pipeline at the same precision,
prompts encoded in every call (`benchmarks/cpu_speed.py --compile`, docs/benchmarks.md, "Read this first"): float32
1.30-1.70× at batch 1 and 1.19-1.42× at batch 64, bfloat16 1.32-1.60× and 1.20-1.39×.

The first call compiles for its input shape (about a minute on that CPU); the first call of another shape compiles once
more, a graph for any batch and image size. So compile a generator that will make many images: a server, a long prompt
file. Frozen weights are constants of the graph: a compiled model is not trained or given other adapters afterwards.
"""

from __future__ import annotations

import torch

from latent_consistency.errors import UserError


def compiler_problem() -> str | None:
    """Why inductor cannot compile for a CPU on this machine, if it cannot: it builds its CPU kernels with a C++ compiler
    (torch's `cpp.cxx` setting, $CXX or g++), and without one the first compiled call fails with a long traceback."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # a torch without these: nothing to check ahead of the first call
        return None
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return ("--compile on a CPU needs a C++ compiler (torch's inductor builds its kernels with one) and none was found: "
                "install g++ (apt install g++) or set CXX, or leave --compile out")
    return None


def sampling_modules(model) -> dict[str, torch.nn.Module]:
    """The modules a sampling call of `model` (a `models.DiffusionModel`) runs: the text encoder(s), the denoising network
    and the decoder `codec.decode` runs (the preview decoder's when one is in use, else the VAE's)."""
    decoder = model.preview_decoder.tiny.decoder if model.preview_decoder is not None else model.vae.decoder
    encoders = {f"text_encoder{i}": encoder for i, encoder in enumerate(model.text_encoders)}
    return encoders | {"network": model.unet, "decoder": decoder}


def compile_for_sampling(model, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Compile `sampling_modules(model)` in place with inductor (`nn.Module.compile`: the objects stay the same, their calls
    run the compiled graph), freezing the weights in reduced precision. Returns the compiled modules; a UserError on a CPU
    without a C++ compiler (`compiler_problem`)."""
    options = {"freezing": True} if dtype in (torch.bfloat16, torch.float16) else None
    modules = sampling_modules(model)
    if model.unet.device.type == "cpu" and (problem := compiler_problem()):
        raise UserError(problem)
    for module in modules.values():
        module.compile(backend="inductor", options=options)
    return modules
