"""Training batches (z, c) = (E(x), text embedding) for one process, with an exact data position.

A latent cache (the paper's D_z = {E(x)}, encoded once) is indexed: moved whole to the device when small, else each
micro-batch gathered from its memory-mapped files; a captions-only cache's captions are encoded per micro-batch by the
run's model, as an image folder's are. Image data (folders, world datasets, shards) is encoded on the fly, one batched
VAE and text-encoder call per batch, never per sample. The data position is a `ResumableSampler` state
(map-style data) or a `ShardStream` state.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable

import torch

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import SkipCounter, SkipEvents
from latent_consistency.data.latent_cache import LatentCache, LongCaptions
from latent_consistency.data.sampler import ResumableSampler
from latent_consistency.data.shards import ShardStream, check_usable
from latent_consistency.data.spec import open_dataset
from latent_consistency.data.workers import read_batches
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import first_process
from latent_consistency.models import DiffusionModel
from latent_consistency.pipelines import MAX_SIZE_FACTOR, normalisable, smallest_normalisable_side

# What a process's data skipped or converted: (counts per reason, the (reason, detail) pairs counted), `skipped_record`
SkipRecord = tuple[dict[str, int], list[tuple[str, str]]]
# The keys of those two in a checkpoint's data position, as a shard stream's position names them (`ShardStream.state_dict`)
SKIPPED_COUNTS, SKIPPED_SEEN = "skipped_counts", "skipped_seen"
# Runs a digest's `compute` where the run wants it computed and gives its value (`TrainingBatches.share_fingerprints`)
Sharer = Callable[[Callable[[], str | None]], str | None]


class TrainingBatches:
    """An endless iterator of micro-batches {"latents", "cond", "captions"} for rank `rank` of `world_size`. `quiet_scan`: an
    image folder's scan is logged by another process (`open_dataset`). `dataset`: `spec`'s, opened already (`held_out`).
    `eval_flag`: the flag that named this data as held-out data apart from the training data (--eval-data), for the
    messages that concern it; None for the training data (or its --eval-fraction)."""

    def __init__(self, spec: str, model: DiffusionModel, resolution: int, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", num_workers: int = 0,
                 holdout: Holdout | None = None, quiet_scan: bool = False, dataset: ImageFolderDataset | None = None,
                 eval_flag: str | None = None):
        self.model, self.micro_batch, self.device, self.spec = model, micro_batch, torch.device(device), spec
        self.eval_flag = eval_flag
        self.seed, self.holdout = seed, holdout
        check_resolution(resolution, model)  # before the data is opened: an image folder's scan is minutes at millions of files
        size_from = "the model's native size (--resolution sets another)" if resolution == model.native_size else None
        self.dataset = dataset if dataset is not None else open_dataset(spec, resolution, seed=seed, rank=rank, world_size=world_size,
                                                                        holdout=holdout, size_from=size_from, quiet_scan=quiet_scan)
        self.resolution = resolution
        self.num_workers = num_workers
        self._check_workers_apply()
        # for a latent cache that cannot be checked against the model, or is split by sample (`LatentCache.holdout_note`), a note
        self.cache_note: str | None = None
        self._check_fits_model()
        self._check_usable()
        if isinstance(self.dataset, ShardStream):
            self.sampler = None
        else:
            if len(self.dataset) < 1:
                raise UserError(f"data {spec} holds no usable samples")
            self.sampler = ResumableSampler(len(self.dataset), seed=seed, rank=rank, world_size=world_size)
        self._iterator = None
        self._digests: dict[str, str | None] = {}  # `fingerprint` and the earlier one, each computed once
        self._share: Sharer = lambda compute: compute()  # `share_fingerprints`
        self._worker_skips = SkipEvents()  # what the DataLoader workers counted (`SkipCounter.take_pending`)
        self._earlier_skips: SkipRecord | None = None  # what a resumed run's data counted before its checkpoint (`load_state_dict`)

    def held_out(self) -> TrainingBatches:
        """The batches of the other side of this --data's held-out split (--eval-fraction), which every process reads whole,
        as rank 0 of 1 (`skipped_record`). An image folder's is the other side of the scan this side made
        (`ImageFolderDataset.take_other_side`): opening --data again for it walked and scanned the folder a second time,
        minutes at 12 million files. Other data is opened again: a latent cache reads its manifest, a folder of shards
        lists its .tar files (thousands, not millions)."""
        dataset = self.dataset.take_other_side() if isinstance(self.dataset, ImageFolderDataset) else None
        return TrainingBatches(self.spec, self.model, self.resolution, self.micro_batch, self.seed, device=self.device,
                               holdout=self.holdout.other(), dataset=dataset)

    def _check_workers_apply(self) -> None:
        """A UserError for --num-workers with data that no worker process reads: a latent cache is indexed (whole on the device, or
        mapped and gathered here) and shards stream in this process, so the option would be accepted and do nothing."""
        if self.num_workers and isinstance(self.dataset, (ShardStream, LatentCache)):
            what = "a latent cache, indexed in this process" if isinstance(self.dataset, LatentCache) else "shards, streamed in this process"
            raise UserError(f"--num-workers {self.num_workers} decodes an image folder in worker processes; the data {self.spec} is "
                            f"{what}, which no worker reads: give --num-workers 0 (the default)")

    def _check_fits_model(self) -> None:
        """Model and data must agree on latent channels, image size and text encoder (the run's resolution, one the model
        takes, was checked before the data was opened: `check_resolution`): a latent cache's latents are of images of that
        size (`_check_cache_size`); a latent cache must have been written by the model's own VAE and text encoder(s)
        (`LatentCache.check_encoders`, last: it reads every weight of them), a captions-only one by its VAE (the run's model
        encodes its captions)."""
        if isinstance(self.dataset, LatentCache):
            unet = self.model.unet.config
            m = self.dataset.manifest
            c = self.dataset.latent_shape[0]
            if c != unet.in_channels:
                raise UserError(f"latent cache has {c} latent channels but the model's UNet takes {unet.in_channels}; encode the data with the model's VAE")
            if not self.dataset.captions_only:  # a captions-only cache holds no conditions: the model encodes its captions
                cached, expected = list(self.dataset.uncond_embedding.shape), list(self.model.prompts.uncond(self.device).shape[1:])
                if cached != expected:  # tokens x width; an SDXL condition has one more row (conditioning.AddedConditioning)
                    raise UserError(f"latent cache conditions are {cached} (tokens x width) but the model's prompt encoder makes "
                                    f"{expected}; encode the captions with the model's text encoder(s): write the cache with this model")
            scale = m.get("scaling_factor")
            if scale is not None and abs(float(scale) - float(self.model.vae.config.scaling_factor)) > 1e-6:
                raise UserError(f"latent cache was made with VAE scaling factor {scale}, the model's VAE has "
                                f"{self.model.vae.config.scaling_factor}; rebuild the cache with this model")
            self._check_cache_size()
            notes = (self.dataset.check_encoders(self.model), self.dataset.holdout_note)  # a cache of an earlier version of lcm
            self.cache_note = "; ".join(note for note in notes if note) or None

    def _check_cache_size(self) -> None:
        """A UserError unless the latent cache holds the latents of images of the run's resolution, which `lcm cache
        --resolution N` reads as a run with --resolution N reads an image folder (an SDXL condition's micro-conditioning
        encoded at N too). A run without --resolution trains at the model's native size: on a cache of another size it is
        refused, not run at the cache's size, so that its config.json (resolution 0: the native size) says the size it
        trained at. Held-out data (`eval_flag`) is read at the training data's size, which its message says: the training
        data's advice (--resolution) would not fit the training data."""
        pixels = self.dataset.latent_shape[-1] * self.model.codec.downsampling_factor
        if self.resolution == pixels:
            return
        if self.eval_flag is not None:
            raise UserError(f"latent cache {self.spec} ({self.eval_flag}) holds the latents of {pixels} px images, and the run trains at "
                            f"{self.resolution} px: held-out data must be at the training data's size; write its cache at "
                            f"{self.resolution} px with lcm cache --resolution {self.resolution}")
        native = self.model.native_size
        if self.resolution == native:
            raise UserError(f"latent cache {self.spec} holds the latents of {pixels} px images, not of the model's native {native} px: "
                            f"train on it with --resolution {pixels}")
        fix = "leave --resolution out" if pixels == native else f"give --resolution {pixels}"
        raise UserError(f"--resolution {self.resolution} does not apply to a latent cache of {pixels} px images ({self.spec}): {fix}, "
                        f"or write a cache at {self.resolution} px with lcm cache --resolution {self.resolution}")

    def _check_usable(self) -> None:
        """Read one sample now, so that data without a single readable one (every image corrupt, shards without a captioned
        image) fails before the run folder is written, not at the first step."""
        if isinstance(self.dataset, ShardStream):
            check_usable(self.dataset)
        elif not isinstance(self.dataset, LatentCache) and len(self.dataset):
            self.dataset[0]  # an image folder skips corrupt images and raises UserError when none decodes

    @property
    def encodes_images(self) -> bool:
        """Whether each batch's images are encoded by the model's VAE as the batch is drawn: image data, not a latent cache."""
        return not isinstance(self.dataset, LatentCache)

    def small_data_note(self, batch_size: int) -> str | None:
        """A note when the data holds fewer samples than one step's batch: every batch then repeats samples (the sampler's
        epochs roll over inside it), which a user with a handful of images may not expect. A shard stream's size is unknown:
        its note is of shards split unevenly over the processes (`ShardStream.uneven_note`)."""
        if isinstance(self.dataset, ShardStream):
            return self.dataset.uneven_note()
        if len(self.dataset) >= batch_size:
            return None
        n = len(self.dataset)
        return (f"the data holds {n} sample{'s' if n != 1 else ''}, fewer than the batch of {batch_size}: every batch repeats each "
                f"sample about {batch_size / n:.2g} times, with its own noise and timestep each time")

    @property
    def uncond(self) -> torch.Tensor:
        """The unconditional embedding ∅ (the empty caption), [1, L, D]: a full latent cache's, else the model's."""
        if isinstance(self.dataset, LatentCache) and not self.dataset.captions_only:
            return self.dataset.uncond_embedding[None].to(self.device)
        return self.model.prompts.uncond(self.device, (self.resolution, self.resolution))

    def first_captions(self, n: int) -> list[str]:
        """The captions of the first `n` samples (of a shard stream: of its shards in order, `ShardStream.first_captions`); an
        image folder's without decoding its images."""
        if isinstance(self.dataset, ShardStream):
            return self.dataset.first_captions(n)
        if isinstance(self.dataset, ImageFolderDataset):
            return list(itertools.islice(self.dataset.samples.captions, n))
        return [self.dataset[i]["caption"] for i in range(min(n, len(self.dataset)))]

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = _micro_batches(self.dataset, self.sampler, self.model, self.device, self.resolution, self.micro_batch,
                                            self.num_workers, self._worker_skips)
        return next(self._iterator)

    def __iter__(self):
        return self

    def fingerprint(self) -> str | None:
        """A digest of the data this process reads (`data_fingerprint`), computed once; None for a named dataset."""
        return self._digest("fingerprint", lambda: data_fingerprint(self.dataset))

    def share_fingerprints(self, share: Sharer) -> None:
        """Have the digests (`fingerprint`, and the earlier one a resume compares) of data that every process reads whole
        computed by `share(compute)`: the run's `compute()` on its first process alone, given to every process, which then
        all reach `state_dict` and `load_state_dict` together. An image folder or a latent cache is the same data in every
        process (the sampler, not the dataset, splits it among them), and each of N processes reading a sample of every
        file of a 12-million-image folder was N times the reads of one. A shard stream is each process's own shards."""
        if not isinstance(self.dataset, ShardStream):
            self._share = share

    def _digest(self, name: str, compute: Callable[[], str | None]) -> str | None:
        if name not in self._digests:
            self._digests[name] = self._share(compute)
        return self._digests[name]

    def state_dict(self) -> dict:
        fingerprint = {"fingerprint": self.fingerprint()} if self.fingerprint() is not None else {}
        if self.sampler is None:
            return {"shards": self.dataset.state_dict()} | fingerprint
        in_flight = 0
        if self._iterator is not None and self.num_workers > 0:
            in_flight = 2 * self.num_workers * self.micro_batch  # DataLoader's default prefetch_factor is 2
        # What the data counted so far goes with the position, as a shard stream's state holds its own (`ShardStream.state_dict`)
        record = self.skipped_record()
        skips = {} if record is None else {SKIPPED_COUNTS: record[0], SKIPPED_SEEN: [list(pair) for pair in record[1]]}
        return {"sampler": self.sampler.state_dict(in_flight=in_flight)} | skips | fingerprint

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; a UserError when the data is not the data it was saved for (its `fingerprint`,
        where the checkpoint has one): the same position in other data is other samples."""
        if self.sampler is None:  # a saved position of another number of samples or shards is refused first, saying so
            self.dataset.load_state_dict(state["shards"])
        else:
            self.sampler.load_state_dict(state["sampler"])
            # a position saved by an earlier version has no counts: the summary then covers the steps since the resume
            self._earlier_skips = (state[SKIPPED_COUNTS], state[SKIPPED_SEEN]) if SKIPPED_COUNTS in state else None
        saved = state.get("fingerprint")  # the earlier digest (reading every file's size) only where the digest differs
        if saved is not None and saved != self.fingerprint() and saved != self._digest("earlier", lambda: earlier_fingerprint(self.dataset)):
            raise UserError(f"the data {self.spec} changed since this run's checkpoint (images or shards added, removed, reordered, "
                            "replaced or recaptioned, or a latent cache rebuilt from other data): resuming would train on other "
                            "samples than the run's; put the data back as it was to resume, or start a new run with another --out")
        self._iterator = None

    def skipped_record(self) -> SkipRecord | None:
        """What this process's data (its DataLoader workers' included) skipped or converted in the whole run, before a
        resume too (`load_state_dict`), as (counts per reason, the (reason, detail) pairs counted): for
        `merged_skipped_summary` over every process of a run, each of which reads its own share of the data. None for data
        that counts nothing.

        Held-out data (--eval-data, `held_out`) is read by every process whole, as rank 0 of 1: the same scan, the same
        samples in the same order, and no DataLoader workers. The processes differ only in how far they read it: all of
        them the fixed held-out set, the main one (under FSDP every one) on for the ω response. The main process's record
        therefore holds every other one's: the run summary's held-out line, from it alone, is whole, and merging the records
        would count once per process each skip past the details kept by name (`NAMED_PER_REASON`)."""
        counter = getattr(self.dataset, "skipped", None)
        if counter is None:
            return None
        counted = counter.with_counted(self._worker_skips)
        if self._earlier_skips is not None:  # a sample named by its detail, read again since the resume, counts once
            counted = merged_skips([self._earlier_skips, (counted.counts, counted.seen)])
        return dict(counted.counts), sorted(counted.seen)


def check_resolution(resolution: int, model: DiffusionModel) -> None:
    """A UserError unless images of `resolution` px fit `model`: `check_resolution_of` its VAE factor, transformer patch,
    native size and networks' configs."""
    check_resolution_of(resolution, model.codec.downsampling_factor, model.patch_size, model.native_size,
                        getattr(model.unet, "config", None), getattr(model.vae, "config", None))


def check_resolution_of(resolution: int, factor: int, patch: int, native_size: int, unet_config, vae_config) -> None:
    """A UserError unless images of `resolution` px fit a model whose VAE downsamples by `factor`, whose transformer cuts
    its latents into patches of `patch` (1 for a UNet), whose native size is `native_size` and whose UNet and VAE have
    the diffusers configs `unet_config` and `vae_config`: a side that is no whole number of latent patches, more than
    MAX_SIZE_FACTOR times the native size, or so small that a GroupNorm of either network sees one value per group
    (`pipelines.normalisable`: such a run fails at its first batch of one, the ω response at its end or a --resume, and
    trains on each norm's bias alone at larger batches), as generation bounds each. The one check of a run's --resolution
    and of `lcm cache --resolution`, which encodes the images a run at that size trains on."""
    if resolution % (factor * patch):
        raise UserError(f"resolution {resolution} is not a multiple of the VAE factor {factor}"
                        + (f" times the transformer's patch size {patch}" if patch > 1 else ""))
    if resolution > MAX_SIZE_FACTOR * native_size:
        raise UserError(f"resolution {resolution} is more than {MAX_SIZE_FACTOR}x the model's {native_size} px; "
                        "train at a size near the model's own")
    if not normalisable(unet_config, vae_config, factor, resolution, resolution):
        side = smallest_normalisable_side(unet_config, vae_config, factor, factor * patch, 2 * MAX_SIZE_FACTOR * native_size)
        raise UserError(f"resolution {resolution} is too small for this model: a feature map of its network would hold one value "
                        f"per normalisation group; use at least {side}")


def merged_skipped_summary(records: list) -> str:
    """What the data skipped or converted, over the `TrainingBatches.skipped_record`s of every process (`merged_skips`).
    "" when no process's data counts."""
    records = [record for record in records if record is not None]
    return merged_skips(records).summary() if records else ""


def merged_skips(records: list[SkipRecord]) -> SkipCounter:
    """The counts of several `SkipRecord`s (every process's, or a run's before and after a resume): a sample named by its
    detail counts once however many of them counted it (an image folder's first images, read by each), one without a
    detail once per time it was counted."""
    merged = SkipCounter()
    for counts, seen in records:
        detailed = Counter(reason for reason, _ in seen)
        for reason, detail in map(tuple, seen):
            if (reason, detail) not in merged.seen:
                merged.seen.add((reason, detail))
                merged.counts[reason] += 1
        for reason, n in counts.items():
            if n > detailed[reason]:
                merged.counts[reason] += n - detailed[reason]
    return merged


def _micro_batches(dataset, sampler, model: DiffusionModel, device, resolution: int, micro_batch: int, num_workers: int,
                   worker_skips: SkipEvents):
    """The micro-batches {"latents", "cond"} of `dataset` in `sampler`'s order, encoded by `model`; what DataLoader workers
    skipped goes into `worker_skips`. A function of its own, not a method: a generator that held its `TrainingBatches`
    would make a reference cycle, freed only by the cyclic garbage collector, whose order of finalisation closed the
    DataLoader's queues before it could tell its workers to stop (each then took 5 s to be given up on)."""
    if isinstance(dataset, LatentCache):
        yield from _cached_micro_batches(dataset, sampler, model, device, resolution, micro_batch)
    long = LongCaptions(model.prompts)
    for images, captions in read_batches(dataset, micro_batch, num_workers, worker_skips, sampler):
        latents = model.codec.encode(images.to(device))
        cond = _encoded_captions(model, captions, device, resolution, long)
        yield {"latents": latents.float(), "cond": cond.float()}


# Captions a run tokenizes a second time to look for ones the text encoder cuts: the start of a run, not every step of it
CAPTIONS_CHECKED = 10_000


def _encoded_captions(model: DiffusionModel, captions: list[str], device, resolution: int, long: LongCaptions) -> torch.Tensor:
    """The conditions of a micro-batch's `captions`; the first time the text encoder cuts some (`LongCaptions`), one note
    in the log naming how many of the captions read so far it cut: a run encodes its captions step by step, and counting
    them all first would tokenize a LAION-sized dataset's before the first step. Only the first CAPTIONS_CHECKED captions
    are looked at: the check tokenizes them again, work a training step need not repeat to its end. In a launched run the
    first process says it, of the captions it read: each process said it of its own, once per process."""
    if not long.count and long.seen < CAPTIONS_CHECKED:
        long.add(captions)
        if (note := long.note("captions of the data read so far")) is not None and first_process():
            logging.getLogger("latent_consistency.data").warning("%s", note)
    return model.prompts.encode(captions, device, (resolution, resolution))


def _cached_micro_batches(cache: LatentCache, sampler, model: DiffusionModel, device, resolution: int, micro_batch: int):
    """The micro-batches of a latent cache in `sampler`'s order, without end. A small cache (`LatentCache.small`) moves to
    the device once and is indexed there; a larger one stays mapped, each micro-batch gathered on the CPU
    (`LatentCache.gather`) and moved alone: the same samples and the same values either way, bit for bit. A captions-only
    cache's conditions are its captions encoded by `model`, as an image folder's are (`_micro_batches`)."""
    whole = cache.tensors(device) if cache.small else None
    indices, long = iter(sampler), LongCaptions(model.prompts)
    while True:
        idx = torch.tensor([next(indices) for _ in range(micro_batch)])
        if cache.captions_only:
            latents = cache.gather_latents(idx).to(device) if whole is None else whole.latents[idx.to(device)]
            yield {"latents": latents, "cond": _encoded_captions(model, cache.captions_of(idx), device, resolution, long).float()}
        elif whole is None:
            latents, cond = cache.gather(idx)
            yield {"latents": latents.to(device), "cond": cond.to(device)}
        else:
            idx = idx.to(device)
            yield {"latents": whole.latents[idx], "cond": whole.text_embeddings[whole.caption_index[idx]]}


def data_fingerprint(dataset) -> str | None:
    """A digest of `dataset`'s samples in order, that a checkpoint records with its data position: an image folder's
    captions, file sizes and samples of each image file's bytes, a latent cache's captions and latents, shards' names,
    sizes and first bytes (each class's `fingerprint`, of the held-out split's side where there is one). None for a
    registered scheme's dataset (the built-in world's, made by code) and a side of its held-out split."""
    return dataset.fingerprint() if isinstance(dataset, (ImageFolderDataset, LatentCache, ShardStream)) else None


def earlier_fingerprint(dataset) -> str | None:
    """The digest of `dataset` that a checkpoint of an earlier version recorded where `data_fingerprint` now gives another
    one: an image folder's captions and file sizes (`ImageFolderDataset.size_fingerprint`). A run upgraded mid-way resumes
    on its unchanged data instead of being told that every image changed. None for other data, whose digest is unchanged."""
    return dataset.size_fingerprint() if isinstance(dataset, ImageFolderDataset) else None
