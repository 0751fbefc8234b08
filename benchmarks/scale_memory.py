"""The memory plan of LCD with a full SDXL student (docs/scale.md), computed rather than guessed: parameter counts of
SDXL's networks built on the meta device, the activations one student forward keeps for its backward (measured on the
meta device: shapes and dtypes, no compute, seconds on a CPU), and the bytes per GPU of every piece on 1, 2, 4 and 8 GPUs.

    python benchmarks/scale_memory.py          # markdown, as docs/scale.md quotes it
    python benchmarks/scale_memory.py --json

Activations: one student forward of batch 1 at 1024² (128² latents; 77 tokens of 2048; SDXL's pooled text and size
conditioning; the ω input) with autograd recording; every tensor autograd saves for the backward is counted once
(`torch.autograd.graph.saved_tensors_hooks`). Attention is counted as a fused kernel (flash / memory-efficient, what
PyTorch's scaled_dot_product_attention runs on a GPU) saves it: q, k, v, the output and a float32 log-sum-exp per query
and head, never the attention matrix. With gradient checkpointing (diffusers checkpoints every ResnetBlock2D and every
BasicTransformerBlock) what stays is those blocks' inputs and what the layers between them save; in the backward one
block is recomputed at a time, so the largest block's own activations are added once. Counted in bf16 (FSDP2's
param_dtype, the loop's autocast) and in fp32 (an upper bound: autocast keeps the norms' outputs in fp32).

The no-grad passes (the teacher's, cond and uncond in one batch, and the target's) keep no activations: their working set
is the UNet's skip connections plus the largest layer's tensors, counted here too.

FSDP2 shards (ZeRO-3, `configs/accelerate/fsdp.yaml`): every parameter of θ, its gradient, AdamW's two moments and θ⁻,
over N GPUs. Not sharded: the frozen teacher, VAE and text encoders (replicated in half precision), the activations, and
the units FSDP2 gathers (in bf16) for the layer running now and the one prefetched, with their bf16 gradients before the
reduce-scatter. accelerate's FSDP2 units: every module the model names in `_no_split_modules` (ResnetBlock2D,
BasicTransformerBlock, CrossAttnUpBlock2D), innermost first, the rest in the root (and one unit for the final norm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1e9  # decimal gigabytes, as GPU memory is sold (an "80 GB" card holds 79.6 GiB usable: torch.cuda.mem_get_info)
GPUS = (1, 2, 4, 8)
LATENT, TOKENS, OMEGA_DIM = 128, 77, 256
MICRO_BATCHES = (1, 4, 12)  # per GPU; 12: diffusers' SDXL LCD recipe


def networks() -> dict[str, torch.nn.Module]:
    """SDXL base's networks on the meta device: the teacher UNet, the student (its UNet with the ω input), VAE and the
    two CLIP text encoders (ViT-L/14 and OpenCLIP bigG/14 with its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gpu_speed import make_sdxl_unet, make_vae
    from latent_consistency.models import make_student_unet

    with torch.device("meta"):
        teacher = make_sdxl_unet(tiny=False)
        student = make_student_unet(teacher, OMEGA_DIM)
        vae = make_vae(tiny=False)
        clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                                            projection_dim=1280))
    return dict(teacher=teacher, student=student, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fsdp_units(unet: torch.nn.Module) -> dict[str, int]:
    """Parameters of each FSDP2 unit as accelerate wraps the UNet (innermost `_no_split_modules` first, then the root)."""
    wrapped = set(unet._no_split_modules)
    owner: dict[int, str] = {}
    for name, module in sorted(unet.named_modules(), key=lambda item: -item[0].count(".")):  # innermost first
        if type(module).__name__ in wrapped or module is unet:
            for p in module.parameters():
                owner.setdefault(id(p), name or "<root>")
    sizes: dict[str, int] = {}
    for p in unet.parameters():
        sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + p.numel()
    return sizes


class _FusedAttention(torch.autograd.Function):
    """What a flash / memory-efficient attention kernel saves for its backward (shapes only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the meta forward is only counted
        raise NotImplementedError


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def activations(unet: torch.nn.Module, dtype: torch.dtype, batch: int = 1) -> dict[str, float]:
    """Bytes the student's forward keeps for its backward (without and with gradient checkpointing), the largest
    checkpointed block's own activations, and the working set of a no-grad forward; one batch of `batch` at 1024²."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet = unet.to(dtype).requires_grad_(True)
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    running: list[torch.nn.Module] = []
    inputs: dict[int, torch.Tensor] = {}  # the checkpointed blocks' inputs (kept with checkpointing)
    block_inputs: dict[torch.nn.Module, set[int]] = {}
    saved: dict[int, tuple[torch.Tensor, torch.nn.Module | None]] = {}
    largest = [0]

    def pre(module, args, kwargs):
        running.append(module)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        block_inputs[module] = {id(t) for t in tensors}
        inputs.update({id(t): t for t in tensors})

    def post(module, args, kwargs, output):
        running.pop()

    def pack(t):
        largest[0] = max(largest[0], _nbytes(t))
        saved.setdefault(id(t), (t, running[-1] if running else None))
        return t

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                           b.register_forward_hook(post, with_kwargs=True))]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FusedAttention.apply(q, k, v)
    try:
        with torch.device("meta"):
            z = torch.empty(batch, 4, LATENT, LATENT, dtype=dtype)
            cond = torch.empty(batch, TOKENS, 2048, dtype=dtype)
            added = {"text_embeds": torch.empty(batch, 1280, dtype=dtype), "time_ids": torch.empty(batch, 6, dtype=dtype)}
            t, omega = torch.full((batch,), 999), torch.empty(batch, OMEGA_DIM, dtype=dtype)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(z, t, cond, timestep_cond=omega, added_cond_kwargs=added)
            # The no-grad working set: the skip connections the down blocks hand to the up blocks, plus the largest layer
            skips: list[torch.Tensor] = []
            hooks = [b.register_forward_hook(lambda m, a, out: skips.extend(out[1])) for b in unet.down_blocks]
            with torch.no_grad():
                unet(z, t, cond, timestep_cond=omega, added_cond_kwargs=added)
            for h in hooks:
                h.remove()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    everything = sum(_nbytes(t) for t, _ in saved.values())
    outside = {key: t for key, (t, owner) in saved.items() if owner is None}
    kept = sum(_nbytes(t) for t in ({**outside, **inputs}).values())
    per_block: dict[torch.nn.Module, int] = {}
    for key, (t, owner) in saved.items():
        if owner is not None and key not in block_inputs[owner]:
            per_block[owner] = per_block.get(owner, 0) + _nbytes(t)
    return dict(no_checkpointing=everything, checkpointed_kept=kept, largest_block=max(per_block.values()),
                no_grad_working_set=sum(_nbytes(s) for s in skips) + 3 * largest[0])


def plan() -> dict:
    nets = networks()
    params = {name: count(m) for name, m in nets.items()}
    units = fsdp_units(nets["student"])
    act = {name: activations(nets["student"], dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    p = params["student"]
    frozen_half = 2 * (params["teacher"] + params["vae"] + params["text_encoder"] + params["text_encoder_2"])
    largest_unit = max(n for name, n in units.items() if name != "<root>")
    rows = {}
    for n in GPUS:
        rows[n] = dict(
            student_fp32=4 * p / n, grads_fp32=4 * p / n, adamw_moments_fp32=8 * p / n, target_fp32=4 * p / n,
            # the unit running and the one prefetched, gathered in bf16, and a unit's bf16 gradient before its reduce-scatter;
            # the root unit (what no wrapped block holds) stays gathered from its forward to its backward
            gathered_units_bf16=2 * (3 * largest_unit + units["<root>"]),
            frozen_teacher_vae_text_half=frozen_half)
    unsharded = dict(student_fp32=4 * p, grads_fp32=4 * p, adamw_moments_fp32=8 * p, adamw_8bit_moments=2 * p, target_fp32=4 * p,
                     autocast_weight_copies_bf16=2 * p, ddp_gradient_buckets_fp32=4 * p, frozen_teacher_vae_text_half=frozen_half)
    states = {f"FSDP2, {n} GPU{'s' * (n > 1)}": sum(rows[n].values()) for n in GPUS}
    plain = sum(v for k, v in unsharded.items() if k not in ("adamw_8bit_moments", "ddp_gradient_buckets_fp32"))
    states |= {"unsharded, 1 GPU, AdamW": plain, "unsharded, 1 GPU, AdamW 8-bit": plain - 6 * p,
               "DDP, any number of GPUs, AdamW 8-bit": plain - 6 * p + 4 * p}
    # The peak: the model states, plus the student's kept activations and one recomputed block at the backward (the no-grad
    # passes come before the student's forward and are smaller: `no_grad_working_set` for twice the micro-batch)
    peak = {name: {b: [total + b * (act[d]["checkpointed_kept"] + act[d]["largest_block"]) for d in ("bf16", "fp32")] for b in MICRO_BATCHES}
            for name, total in states.items()}
    # Before sharding, each process holds the teacher as loaded (fp32), the student and θ⁻ copies, VAE and text encoders
    load_peak = 4 * (params["teacher"] + 2 * p + params["vae"] + params["text_encoder"] + params["text_encoder_2"])
    return dict(params=params, load_peak_fp32=load_peak, fsdp_units=dict(root=units["<root>"], largest=largest_unit, count=len(units)),
                activations_per_sample=act, per_gpu_fsdp=rows, unsharded_one_gpu=unsharded, peak_per_gpu=peak)


def markdown(result: dict) -> str:
    params, act, rows = result["params"], result["activations_per_sample"], result["per_gpu_fsdp"]
    gb = lambda b: f"{b / GB:.1f}"
    lines = ["| network | parameters | bytes |", "| --- | ---: | ---: |"]
    for name, dtype in (("student", "fp32"), ("teacher", "bf16"), ("vae", "bf16"), ("text_encoder", "bf16"), ("text_encoder_2", "bf16")):
        lines.append(f"| {name} | {params[name]:,} | {gb(params[name] * (4 if dtype == 'fp32' else 2))} GB {dtype} |")
    lines += ["", "| activations per sample at 1024² | bf16 | fp32 (bound) |", "| --- | ---: | ---: |"]
    for key, label in (("no_checkpointing", "kept for the backward, no checkpointing"), ("checkpointed_kept", "kept, gradient checkpointing"),
                       ("largest_block", "+ the largest block, recomputed in the backward"), ("no_grad_working_set", "a no-grad pass (teacher, target)")):
        lines.append(f"| {label} | {gb(act['bf16'][key])} GB | {gb(act['fp32'][key])} GB |")
    names = list(rows[1])
    lines += ["", "| per GPU, FSDP2 full sharding | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in GPUS) + " |",
              "| --- |" + " ---: |" * len(GPUS)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(gb(rows[n][name]) for n in GPUS) + " |")
    lines.append("| **model states, total** | " + " | ".join(f"**{gb(sum(rows[n].values()))}**" for n in GPUS) + " |")
    unsharded = result["unsharded_one_gpu"]
    lines += ["", "| one GPU, unsharded | GB |", "| --- | ---: |"] + [f"| {k} | {gb(v)} |" for k, v in unsharded.items()]
    lines += ["", "| peak per GPU, gradient checkpointing (bf16 – fp32 bound) | " + " | ".join(f"micro-batch {b}" for b in MICRO_BATCHES) + " |",
              "| --- |" + " ---: |" * len(MICRO_BATCHES)]
    for name, by_batch in result["peak_per_gpu"].items():
        lines.append(f"| {name} | " + " | ".join(f"{gb(lo)} – {gb(hi)}" for lo, hi in by_batch.values()) + " |")
    units = result["fsdp_units"]
    lines += ["", f"Before the first step, while loading: {gb(result['load_peak_fp32'])} GB per GPU (teacher as loaded, student and "
              "target in fp32, VAE and text encoders), then the teacher is cast to half precision and θ, θ⁻ are sharded."]
    lines += ["", f"FSDP2 units: {units['count']}; the largest {units['largest']:,} parameters, the root {units['root']:,}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = plan()
    print(json.dumps(result, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
