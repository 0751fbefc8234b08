"""Hugging Face Hub ids (`org/name`) where a model goes: which names are hub ids, where one is read from (offline: its
snapshot in the local cache, read as a local folder is), the commit it loads, and the one-line refusals of the names that
cannot be had (not in the cache offline, not valid, a revision, a hub page's address, a folder inside a repo).

A local folder of the same relative path is read instead, as diffusers reads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from latent_consistency.errors import UserError


def looks_like_hub_id(name: str) -> bool:
    """A name that is no path here and has the hub's org/name form: a local folder of that relative path, where there is
    one, is read instead (as diffusers reads it)."""
    return not os.path.isabs(name) and name.count("/") == 1 and not name.startswith(".") and not Path(name).exists()


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub repo's snapshot in the local cache (the revision its refs/main names; its files are symlinks
    to the cache's blobs), None when the cache has none."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):
        return None


def offline_snapshot(name: str) -> Path | None:
    """Where a hub id is read from with the hub offline (HF_HUB_OFFLINE): its cached snapshot folder, read as a local
    folder is, so that what the loaders read beside the weights (a guidance record, a LoRA's scheduler config) is read for
    it too and the hub client has no revision to ask for; None for a local path, a hub id online (the hub says its latest
    revision then) or one not in the cache."""
    from huggingface_hub import constants

    if not looks_like_hub_id(name) or not constants.HF_HUB_OFFLINE:
        return None
    return _cached_snapshot(name)


def hub_revision(name: str) -> str | None:
    """The commit of the hub repo a hub id loads: online the hub's latest, offline the one in the local cache (the
    revision `offline_snapshot` reads); None for a local path or a hub id that cannot be resolved."""
    from huggingface_hub import constants, resolve_revision
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    if not looks_like_hub_id(name):
        return None
    try:
        return resolve_revision(name, local_files_only=constants.HF_HUB_OFFLINE).resolved
    except (OSError, ValueError, HfHubHTTPError, RevisionResolutionError):
        return None


# The prefixes of a hub repo's address, as a user copies it from the hub's page
HUB_ADDRESS = re.compile(r"^(https?://(www[.])?(huggingface|hf)[.]co/|hf://)")


def _hub_repo_hint(name: str) -> str:
    """What to give for a name that is no folder here but names something of a hub repo: a revision of it (org/name@rev),
    its address (https://huggingface.co/org/name), or a folder or file in it (org/name/unet, where org/name is in the
    local cache); "" for any other name."""
    if "@" in name and looks_like_hub_id(name):
        repo, revision = name.split("@", 1)
        return (f"a hub id takes no revision (@{revision}): download that revision into a folder (`hf download {repo} "
                f"--revision {revision} --local-dir FOLDER`) and give the folder")
    address = HUB_ADDRESS.sub("", name)
    parts = address.strip("/").split("/")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or os.path.isabs(address) or address.startswith(".") or (address == name and _cached_snapshot(repo) is None):
        return ""
    inside = "/".join(parts[2:]) if address == name else ""  # an address's tail (tree/main) is the hub page's, not the repo's
    what = f"the {inside} of the hub repo {repo}, which is not loaded on its own" if inside else f"the hub repo {repo}"
    return f"it names {what}: give its hub id, {repo}"


def check_hub_id(name: str, what: str) -> str:
    """Where to load `what` `name` from: a local path (or a name that is no hub id) as given, for its loader; a hub id
    online as given, for diffusers to download; offline (HF_HUB_OFFLINE) its snapshot in the local cache
    (`offline_snapshot`). A hub id that is not valid, or offline not in the cache, is a UserError at once ("cannot load
    `what` `name`: ..."), which also covers a mistyped local path (runs/lcm), rather than the hub client's messages; so
    is a name that is no folder here but names a hub repo's revision, address or folder (`_hub_repo_hint`)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    if not looks_like_hub_id(name):
        hint = "" if Path(name).exists() else _hub_repo_hint(name)
        if hint:
            raise UserError(f"cannot load {what} {name}: it is not a folder here; {hint}")
        return name
    try:
        validate_repo_id(name)
    except ValueError:
        hint = _hub_repo_hint(name) or "a hub id is org/name, of letters, digits, '-', '_' and '.'"
        raise UserError(f"cannot load {what} {name}: it is not a folder here, nor a valid hub id; {hint}") from None
    if not constants.HF_HUB_OFFLINE:
        return name
    snapshot = offline_snapshot(name)
    if snapshot is None:
        raise UserError(f"cannot load {what} {name}: it is not a folder here, and as a hub id it is not in the local cache (HF_HUB_OFFLINE "
                        f"is set); give a local folder, or download it first (`hf download {name}`)")
    return str(snapshot)
