"""The latent cache: a dataset encoded once into latents and text embeddings, D_z = {E(x)} (Section 4.3).

On disk (safetensors, no pickles):

    manifest.json              written last: a folder without it is not a cache
    captions.safetensors       text_embeddings [U,L,D] (one per distinct caption), uncond_embedding [L,D]
                               (the embedding of ""); the caption strings are in its metadata
    shard-00000.safetensors    latents [n,C,h,w] (scaled: z = E(x), see `models.LatentCodec`),
    ...                        caption_index [n] (rows of text_embeddings)

Captions repeat in a captioned toy dataset, so each distinct caption is encoded and stored once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.shards import ShardStream
from latent_consistency.data.workers import read_batches
from latent_consistency.errors import UserError, first_line
from latent_consistency.models import LatentCodec
from latent_consistency.outputs import partial_folder, start_partial
from latent_consistency.progress import progress_bar

FORMAT = "latent-cache/1"
MANIFEST = "manifest.json"
CAPTIONS = "captions.safetensors"
PARTIAL_MARK = ".lcm-latent-cache"  # in `<cache>.partial` while it is written


@torch.no_grad()
def write_latent_cache(
    dataset,
    out_dir: str | Path,
    codec: LatentCodec,
    prompts,
    source: dict,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode each usable sample of `dataset` (items {"image" in [-1, 1], "caption"}; an image folder, webdataset shards or a
    map-style dataset, `usable_batches`) once into a cache at `out_dir`: latents with `codec`, each distinct caption and ∅
    once with the prompt encoder `prompts` (`models.DiffusionModel.prompts`; an SDXL condition carries the images' size as
    its micro-conditioning).

    `source` (e.g. dataset name, split, resolution, seed) is recorded in the manifest. The folder is
    written as `<out_dir>.partial` and renamed when complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"latent cache folder {out_dir} already exists; remove it or pick another folder")
    if not isinstance(dataset, ShardStream) and len(dataset) == 0:
        raise UserError("cannot cache an empty dataset")
    partial = start_partial(partial_folder(out_dir, "runs/latents"), PARTIAL_MARK, "a latent cache")
    caption_ids: dict[str, int] = {}
    shards: list[dict] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (latents, caption_index) not yet in a shard

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        latents, index = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        save_file({"latents": latents.contiguous(), "caption_index": index}, str(partial / name))
        shards.append({"file": name, "num_samples": len(index)})
        pending.clear()

    total = None if isinstance(dataset, ShardStream) else len(dataset)
    with progress_bar(total=total, desc="latent cache", unit="sample", disable=not progress) as bar:  # closed before a stop's one line
        for images, captions in usable_batches(dataset, batch_size, num_workers):
            encoded = codec.encode(images)
            latents = encoded.float().cpu()
            _check_encoded(out_dir, {"latents": latents}, encoded.dtype)
            index = torch.tensor([caption_ids.setdefault(c, len(caption_ids)) for c in captions], dtype=torch.int64)
            pending.append((latents, index))
            if sum(len(p[1]) for p in pending) >= shard_size:
                flush()
            bar.update(len(captions))  # samples written: short of the total by those skipped
    if pending:
        flush()
    if not shards:
        skipped = getattr(dataset, "skipped", None)
        raise UserError(f"no usable sample in the data ({skipped.summary() if skipped else 'none given'}); check the files")

    captions = list(caption_ids)
    size = tuple(images.shape[-2:])  # the last batch's: every image is resolution x resolution
    embeddings = torch.cat([prompts.encode(captions[i : i + batch_size], device, size) for i in range(0, len(captions), batch_size)])
    uncond = prompts.uncond(device, size)[0]
    _check_encoded(out_dir, {"text embeddings": embeddings, "empty prompt's embedding": uncond}, embeddings.dtype)
    save_file(
        {"text_embeddings": embeddings.float().cpu().contiguous(), "uncond_embedding": uncond.float().cpu().contiguous()},
        str(partial / CAPTIONS),
        metadata={"captions": json.dumps(captions)},
    )
    manifest = {
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "latent_channels": int(latents.shape[1]),
        "latent_size": list(latents.shape[2:]),
        "scaling_factor": codec.scaling_factor,
        "num_captions": len(captions),
        "text_hidden_size": int(embeddings.shape[-1]),
        "max_length": int(embeddings.shape[1]),
        "source": source,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    partial.rename(out_dir)  # marked until renamed: a kill before this leaves a `.partial` that a rerun may replace
    (out_dir / PARTIAL_MARK).unlink()
    return out_dir


@dataclass
class CachedLatents:
    """A whole cache as tensors: sample i is (latents[i], text_embeddings[caption_index[i]])."""

    latents: torch.Tensor
    caption_index: torch.Tensor
    text_embeddings: torch.Tensor
    uncond_embedding: torch.Tensor


class LatentCache(torch.utils.data.Dataset):
    """A latent cache read back; items {"latents" [C,h,w], "text_embedding" [L,D], "caption"}."""

    def __init__(self, path: str | Path, holdout: Holdout | None = None):
        path = Path(path)
        self.manifest = _read_manifest(path)
        shards = [_read_tensors(path, s["file"], ("latents", "caption_index")) for s in self.manifest["shards"]]
        table = _read_tensors(path, CAPTIONS, ("text_embeddings", "uncond_embedding"))
        try:
            self.latents = torch.cat([s["latents"] for s in shards])
            self.caption_index = torch.cat([s["caption_index"] for s in shards])
            with safe_open(str(path / CAPTIONS), framework="pt") as f:
                self.captions = json.loads((f.metadata() or {})["captions"])
        except (RuntimeError, KeyError, ValueError):  # shards of different latent shapes, no caption strings
            raise UserError(f"latent cache {path} is damaged (its shards or captions do not fit together); rebuild it") from None
        self.text_embeddings, self.uncond_embedding = table["text_embeddings"], table["uncond_embedding"]
        index = self.caption_index
        if (len(self.latents) != self.manifest["num_samples"] or not isinstance(self.captions, list)
                or len(self.captions) != len(self.text_embeddings) or len(index) != len(self.latents)
                or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self.captions))):
            raise UserError(f"latent cache {path} is inconsistent with its manifest; rebuild it")
        bad = _non_finite({"latents": self.latents, "text_embeddings": self.text_embeddings, "uncond_embedding": self.uncond_embedding})
        if bad:
            raise UserError(f"latent cache {path} is damaged: its {bad} hold NaN or infinite values (a float16 VAE or text encoder "
                            "overflows on some inputs); rebuild the cache with the model in float32")
        if holdout is not None:  # a cache has no files: samples are held out by index
            keep = torch.tensor(holdout.select([str(i) for i in range(len(self.latents))], "samples"))
            self.latents, self.caption_index = self.latents[keep], self.caption_index[keep]

    def __len__(self) -> int:
        return len(self.latents)

    def fingerprint(self) -> str:
        """A digest of the samples in order: the latents' shape, each sample's caption and its first 16 latent values, exactly
        (a cache rebuilt from the same images with the same models has the same one, from other images or models another).
        A training checkpoint records it, so that a run is not resumed on a rebuilt cache of other data of the same size."""
        digest = hashlib.sha256(json.dumps([list(self.latents.shape), [self.captions[int(c)] for c in self.caption_index]]).encode())
        digest.update(self.latents.reshape(len(self.latents), -1)[:, :16].float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def __getitem__(self, i: int) -> dict:
        c = int(self.caption_index[i])
        return {"latents": self.latents[i], "text_embedding": self.text_embeddings[c], "caption": self.captions[c]}

    def tensors(self, device: torch.device | str = "cpu") -> CachedLatents:
        """The whole cache on `device`, for training loops that index batches themselves."""
        return CachedLatents(
            self.latents.to(device), self.caption_index.to(device), self.text_embeddings.to(device), self.uncond_embedding.to(device)
        )


def usable_batches(dataset, batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches (images, captions) of each usable sample of `dataset` once, in order: an image folder's corrupt image is left
    out (`ImageFolderDataset.read`), where its `__getitem__`, for a training run that draws without end, stands the next
    sample in for it and the cache would hold that sample twice; shards are read shard after shard
    (`ShardStream.samples_once`), where their stream resamples without end. `num_workers` DataLoader worker processes read
    a map-style dataset (shards decode on threads in this process), with training's handling of their errors, skip counts
    and stops (`data.workers`); what they skipped is counted into `dataset.skipped` at the end."""
    if isinstance(dataset, ShardStream):
        samples, num_workers = _SamplesOnce(dataset), 0
    else:
        samples = _Read(dataset) if isinstance(dataset, ImageFolderDataset) else dataset
    counter, counted = getattr(dataset, "skipped", None), []
    yield from read_batches(samples, batch_size, num_workers, counted)
    if counter is not None and counted:
        merged = counter.with_counted(counted)
        counter.counts, counter.seen = merged.counts, merged.seen


class _Read(torch.utils.data.Dataset):
    """An image folder's samples each as itself, None for a corrupt one (`ImageFolderDataset.read`)."""

    def __init__(self, folder: ImageFolderDataset):
        self.folder, self.skipped = folder, folder.skipped  # `skipped`: what `collate` sends back from a worker

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict | None:
        return self.folder.read(index)


class _SamplesOnce(torch.utils.data.IterableDataset):
    """Shards' usable samples, each once (`ShardStream.samples_once`)."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        return self.stream.samples_once()


def _read_manifest(path: Path) -> dict:
    """The manifest of the cache at `path`: a JSON object of format FORMAT that lists at least one shard file."""
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a latent cache (no {MANIFEST}); write one with write_latent_cache")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({err}); rebuild the latent cache") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path / MANIFEST} does not hold a JSON object; rebuild the latent cache")
    made = manifest.get("format")
    if not (isinstance(made, str) and made.startswith("latent-cache/")):  # another tool's manifest.json
        raise UserError(f'{path / MANIFEST} is not a latent cache\'s (it has no "format": "{FORMAT}"), and a folder with a '
                        "manifest.json is read as a latent cache: to train on the images in it, move manifest.json out of the folder")
    if made != FORMAT:
        raise UserError(f"{path} holds a latent cache of format {made!r}, not {FORMAT!r}; rebuild it")
    shards = manifest.get("shards")
    if (not isinstance(shards, list) or not shards or not isinstance(manifest.get("num_samples"), int)
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards)):
        raise UserError(f"{path / MANIFEST} lists no shard files or no sample count; rebuild the latent cache")
    return manifest


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor that holds NaN or infinity (what a float16 VAE or text encoder gives where it
    overflows: not data to train on), or None."""
    for name, tensor in tensors.items():
        # in chunks of 16M values: a mask of a whole large cache at once would take a quarter of its memory again
        if not all(bool(torch.isfinite(chunk).all()) for chunk in tensor.reshape(-1).split(1 << 24)):
            return name
    return None


def _check_encoded(out_dir: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A UserError as soon as encoding gives a non-finite value: a cache that would be refused when read is not written."""
    bad = _non_finite(tensors)
    if bad:
        raise UserError(f"encoding the data into {out_dir}: the {bad} came out NaN or infinite in {str(dtype).removeprefix('torch.')} "
                        "(a float16 VAE or text encoder overflows on some inputs); encode with the model in float32")


def _read_tensors(path: Path, file: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of the cache file `file` in `path`; a missing, unreadable or incomplete file is a UserError."""
    target = path / file
    if not target.is_file():
        raise UserError(f"latent cache {path} is missing its file {file}; rebuild the cache")
    try:
        tensors = load_file(str(target))
    except SafetensorError as err:
        raise UserError(f"latent cache file {target} is unreadable ({first_line(err)}); rebuild the cache") from None
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise UserError(f"latent cache file {target} has no {', '.join(missing)}; rebuild the cache")
    return tensors
