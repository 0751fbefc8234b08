"""Where and in what precision to run: `--device` and `--dtype` as the commands take them, `device=` and `dtype=` as a
Python call does."""

from __future__ import annotations

import weakref

import torch

from latent_consistency.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must name a device this machine has. An error names the device
    as `flag` took it: "--device cuda" on the command line, "device='cuda'" where `flag` is a Python call's argument."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{given(flag, name)} was asked for but no CUDA GPU is available; use {given(flag, 'cpu')}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError(f"{given(flag, name)} was asked for but MPS is not available; use {given(flag, 'cpu')}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """The weights' and latents' dtype by name. float16 is refused on the CPU: PyTorch runs it there, but without
    half-precision kernels on most CPUs (a 3×3 convolution 80× slower than in float32 on an AVX-512 EPYC, 2026-12-07).
    An error names the dtype to use as `flag` takes it (`resolve_device`)."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise UserError("float16 on the CPU is refused: most CPUs have no float16 kernels and run it many times slower than "
                        f"float32; use {given(flag, 'float32')}, or bfloat16 (fast where the CPU has bfloat16 instructions)")
    return DTYPES[name]


def given(flag: str, value: str) -> str:
    """`value` given to `flag` as its caller writes it: `--device cpu` for a command's flag, `device='cpu'` for a Python
    call's argument."""
    return f"{flag} {value}" if flag.startswith("--") else f"{flag}={value!r}"


# (first parameter's storage, dtype, device) -> (device, dtype) of each module asked (`weights_placement`)
_PLACEMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a diffusers or transformers model's weights, as its own `.device` and `.dtype` give them, which
    walk every submodule (1.5 ms each for SD 1.5's 709-module UNet on one CPU core, several times per image), remembered
    while its first parameter is the same tensor: `.to()` and every cast of the module replace that one too, so the next
    call asks the model again."""
    first = next(module.parameters(), None)
    key = None if first is None else (first.data_ptr(), first.dtype, first.device)
    saved = _PLACEMENTS.get(module)
    if saved is not None and key is not None and saved[0] == key:
        return saved[1]
    placement = (module.device, module.dtype)
    if key is not None:
        _PLACEMENTS[module] = (key, placement)
    return placement
