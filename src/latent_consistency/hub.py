"""Hugging Face Hub ids (`org/name`, or `org/name@rev` pinned to a branch, tag or commit) where a model goes: which names
are hub ids, where one is read from, the commit it loads, and the one-line refusals of the names that cannot be had (not
on the hub or in the cache, not valid, a hub page's address, a folder inside a repo).

A hub id is read as a local folder is: from its snapshot in the local cache, into which, online, the files its loader
reads are downloaded first (`hub_snapshot`). So what the loaders read beside the weights (a guidance record, a
progressively distilled model's step count, a LoRA's scheduler config) is read for it online as offline, all of it from
one commit. A local folder of the same relative path is read instead, as diffusers reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from latent_consistency.errors import UserError, first_line

# The files of a hub repo its loader reads (fnmatch patterns, whose `*` crosses folders), and those it never does. A
# diffusers pipeline: its configs, records and tokenizers, and the weights of the components loaded (not its safety
# checker, nor a single-file checkpoint at its top); no variant's weights (unet/diffusion_pytorch_model.fp16.safetensors),
# as none is loaded here.
PIPELINE_WEIGHTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
PIPELINE_FILES = ("*.json", "*.txt", "*.model", *(f"{part}/*.safetensors" for part in PIPELINE_WEIGHTS))
PIPELINE_IGNORED = ("*.*.safetensors",)


def pipeline_files(weights: tuple[str, ...] = PIPELINE_WEIGHTS) -> tuple[str, ...]:
    """`PIPELINE_FILES` with the weights of the components `weights` alone: what a loader that reads only some of a pipeline
    downloads (`lcm cache`: the VAE and text encoder(s), not SD 1.5's 3.4 GB UNet; the VAE alone with --captions-only)."""
    return ("*.json", "*.txt", "*.model", *(f"{part}/*.safetensors" for part in weights))


# A LoRA's or a single model's (TAESD's): the weights and configs at its top
TOP_FILES, TOP_IGNORED = ("*.json", "*.safetensors"), ("*/*",)
# Weights files a model folder may hold that are not loaded here: PyTorch pickles, and variants (name.fp16.safetensors)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
VARIANT_WEIGHTS = re.compile(r"[.]([A-Za-z0-9_]+)(-[0-9]+-of-[0-9]+)?[.]safetensors$")


def weights_hint(folder: Path, loader: str) -> str:
    """What a local model folder whose weights did not load holds in place of plain safetensors weights, and what to do
    about it, `loader` being the class that loads it (DiffusionPipeline for a model's components, AutoencoderTiny for a
    preview decoder); "" when it holds neither pickles nor variant weights (or is no local folder)."""
    names = sorted(f.name for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    if any(name.endswith(".safetensors") and not VARIANT_WEIGHTS.search(name) for name in names):
        return ""
    variants = [name for name in names if VARIANT_WEIGHTS.search(name)]
    if variants:
        variant = VARIANT_WEIGHTS.search(variants[0]).group(1)
        return (f"{folder} holds only {variants[0]}, weights of the {variant} variant; save the model without a variant, e.g. "
                f"{loader}.from_pretrained(FOLDER, variant=\"{variant}\").save_pretrained(NEW_FOLDER)")
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return (f"{folder} holds its weights only as {pickles[0]}, a PyTorch pickle, which is not loaded here; convert the folder to "
                f"safetensors, e.g. {loader}.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER, safe_serialization=True)")
    return ""


def given_name(name: str | os.PathLike, what: str, give: str = "a folder or a hub id") -> str:
    """A model's, LoRA's or preview decoder's name (or a data folder's) as the user gave it, a str or `pathlib.Path`, as
    text with a leading `~` expanded as a shell expands it (a hub id never starts with one). A blank name is a UserError:
    `Path("")` is the current folder, whose model, LoRA or cache would be read in silence; so is a name that is no text
    (None, a number). `what` names the thing read, as `check_hub_id` takes it; `give`, what to give instead."""
    if not isinstance(name, (str, bytes, os.PathLike)):
        raise UserError(f"cannot load {what} {name!r:.40}: give {give} (a str or pathlib.Path)")
    name = os.fsdecode(name)
    if not name.strip():
        raise UserError(f"cannot load {what} {name!r}: the name is empty; give {give}")
    return os.path.expanduser(name)


def split_revision(name: str | os.PathLike) -> tuple[str, str | None]:
    """A hub id's repo and the revision after its @ (a branch, tag or commit; "" for a bare @), None without one."""
    repo, at, revision = os.fsdecode(name).partition("@")
    return repo, revision if at else None


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    """A name that is no path here and has the hub's org/name form, with or without @rev: a local folder of that relative
    path, where there is one, is read instead (as diffusers reads it). A `pathlib.Path` is taken as its text."""
    name = os.fsdecode(name)
    repo = split_revision(name)[0]
    return not os.path.isabs(name) and repo.count("/") == 1 and not name.startswith(".") and not Path(name).exists()


@contextlib.contextmanager
def _no_match_unlogged():
    """huggingface_hub's warning that no file of a repo matched the patterns off for the duration: said once, here."""
    logger = logging.getLogger("huggingface_hub._snapshot_download")

    def other(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files matched")

    logger.addFilter(other)
    try:
        yield
    finally:
        logger.removeFilter(other)


def hub_snapshot(name: str, what: str, files: tuple[str, ...] = PIPELINE_FILES, ignored: tuple[str, ...] = PIPELINE_IGNORED) -> Path:
    """The snapshot folder of the hub id `name` in the local cache, holding the `files` of its repo (less `ignored`) at its
    revision: online, downloaded first where missing; offline (HF_HUB_OFFLINE), the cached one. A snapshot that another
    download left without some of them (diffusers', `hf download --include`) is read as it is offline: its loader says
    what it lacks. A repo, revision or cache that cannot be had is a UserError "cannot load `what` `name`: ...". The folder
    need not exist: a repo may hold none of the files."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_revision(name)
    at = "" if revision is None else f" at revision {revision}"
    try:
        with _no_match_unlogged():
            return Path(snapshot_download(repo, revision=revision, allow_patterns=list(files), ignore_patterns=list(ignored),
                                          local_files_only=constants.HF_HUB_OFFLINE))
    except IncompleteSnapshotError as err:
        return Path(err.snapshot_path)
    except LocalEntryNotFoundError:
        why = ("(HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else
               "and the hub cannot be reached")
        raise UserError(f"cannot load {what} {name}: it is not a folder here, and as a hub id{at} it is not in the local cache {why}; "
                        f"give a local folder, or download it first (`hf download {repo}"
                        f"{'' if revision is None else f' --revision {revision}'}`)") from None
    except RevisionNotFoundError:
        raise UserError(f"cannot load {what} {name}: the hub repo {repo} has no revision {revision} (a branch, tag or commit); "
                        f"give one it has, or {repo} for its latest") from None
    except RepositoryNotFoundError:
        raise UserError(f"cannot load {what} {name}: it is not a folder here, and the hub has no repo {repo} (or it is private or "
                        "gated: log in with `hf auth login`, and accept its terms on its page)") from None
    except (OSError, HfHubHTTPError, ValueError) as err:
        raise UserError(f"cannot load {what} {name} from the hub: {first_line(err)}") from err


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub repo's snapshot in the local cache (the revision its refs/main names; its files are symlinks
    to the cache's blobs), None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except IncompleteSnapshotError as err:  # downloaded in part (`hub_snapshot`): it is in the cache all the same
        return Path(err.snapshot_path)
    except (OSError, ValueError):
        return None


def hub_revision(name: str) -> str | None:
    """The commit of the hub repo a hub id loads (at its @rev, if it has one): online the hub's latest, offline the one in
    the local cache (the revision `hub_snapshot` reads); None for a local path or a hub id that cannot be resolved."""
    from huggingface_hub import constants, resolve_revision
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    if not looks_like_hub_id(name):
        return None
    repo, revision = split_revision(name)
    try:
        return resolve_revision(repo, revision=revision, local_files_only=constants.HF_HUB_OFFLINE).resolved
    except (OSError, ValueError, HfHubHTTPError, RevisionResolutionError):
        return None


# The prefixes of a hub repo's address, as a user copies it from the hub's page
HUB_ADDRESS = re.compile(r"^(https?://(www[.])?(huggingface|hf)[.]co/|hf://)")


def _hub_repo_hint(name: str) -> str:
    """What to give for a name that is no folder here but names something of a hub repo: its address
    (https://huggingface.co/org/name), or a folder or file in it (org/name/unet, where org/name is in the local cache);
    "" for any other name."""
    address = HUB_ADDRESS.sub("", name)
    parts = address.strip("/").split("/")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or os.path.isabs(address) or address.startswith(".") or (address == name and _cached_snapshot(repo) is None):
        return ""
    inside = "/".join(parts[2:]) if address == name else ""  # an address's tail (tree/main) is the hub page's, not the repo's
    what = f"the {inside} of the hub repo {repo}, which is not loaded on its own" if inside else f"the hub repo {repo}"
    return f"it names {what}: give its hub id, {repo}"


def check_hub_id(name: str, what: str, files: tuple[str, ...] = PIPELINE_FILES, ignored: tuple[str, ...] = PIPELINE_IGNORED) -> str:
    """Where to load `what` `name` from: a local path (or a name that is no hub id) as given, for its loader; a hub id, its
    snapshot folder (`hub_snapshot`: online, downloaded first). A hub id that is not valid, or cannot be had, is a
    UserError at once ("cannot load `what` `name`: ..."), which also covers a mistyped local path (runs/lcm), rather than
    the hub client's messages; so is a name that is no folder here but names a hub repo's address or folder
    (`_hub_repo_hint`), and a repo that holds none of the files `what` is read from. A `pathlib.Path` is taken as its text,
    `~` expanded; a blank name is refused (`given_name`)."""
    from huggingface_hub.utils import validate_repo_id

    name = given_name(name, what)
    if not looks_like_hub_id(name):
        hint = "" if Path(name).exists() else _hub_repo_hint(name)
        if hint:
            raise UserError(f"cannot load {what} {name}: it is not a folder here; {hint}")
        return name
    repo, revision = split_revision(name)
    try:
        validate_repo_id(repo)
    except ValueError:
        hint = _hub_repo_hint(name) or "a hub id is org/name, of letters, digits, '-', '_' and '.'"
        raise UserError(f"cannot load {what} {name}: it is not a folder here, nor a valid hub id; {hint}") from None
    if revision == "":
        raise UserError(f"cannot load {what} {name}: nothing follows its @; give {repo}@REVISION (a branch, tag or commit), or {repo}")
    snapshot = hub_snapshot(name, what, files, ignored)
    if not snapshot.is_dir() or not any(snapshot.iterdir()):
        raise UserError(f"cannot load {what} {name}: the hub repo {repo} holds none of the files it is read from "
                        f"({', '.join(files)}); is it another kind of model?")
    return str(snapshot)
