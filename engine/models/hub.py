"""Hugging Face repo ids as models: `--model stabilityai/stable-diffusion-3-medium-diffusers`
resolves, as diffusers' own `from_pretrained` does, into a snapshot folder of the standard HF
cache, which the engine then serves like any local folder (its workers never touch the hub).

The download is diffusers' `DiffusionPipeline.download`: it fetches only the files a pipeline
loads (one weight format, the `variant`'s files), shows huggingface_hub's progress bar, and
honours HF_HUB_OFFLINE, HF_TOKEN, HF_HOME and HF_HUB_CACHE. Offline, or with the hub out of
reach, a cached snapshot is used; a repo that is not cached gets one line saying how to get it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("dfuse.models")

# owner/name, as the hub spells repo ids (huggingface_hub's validate_repo_id is the final word)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and ".." not in model and not model.endswith((".", "-"))


def hub_cache() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub), read now rather than when
    huggingface_hub was imported, so `dfuse models list` and a download agree on it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def download(repo_id: str, revision: str | None = None, variant: str | None = None) -> Path:
    """The snapshot folder of `repo_id` in the HF cache, downloaded first where it is not there;
    ValueError naming `model` (one line, what to do) where it cannot be had."""
    return _download(repo_id, revision, variant, hub_cache())


@functools.lru_cache(maxsize=16)  # the CLI checks a model before its Engine resolves it again: one hub call
def _download(repo_id: str, revision: str | None, variant: str | None, cache: Path) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    get_it = (f"download it where the hub is reachable (`hf download {repo_id}"
              + (f" --revision {revision}" if revision else "") + "`), or pass --model a local diffusers folder")
    try:
        folder = Path(DiffusionPipeline.download(repo_id, revision=revision, variant=variant, cache_dir=cache))
    except GatedRepoError:
        raise ValueError(f"model: {repo_id!r} is gated on the Hugging Face hub: accept its licence on the hub and "
                         "log in (`hf auth login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"model: {repo_id!r} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model: {repo_id!r} is not a repository on the Hugging Face hub that this token can "
                         "read (private ones need `hf auth login` or HF_TOKEN)") from None
    except HFValidationError as e:
        raise ValueError(f"model: {repo_id!r} is not a valid Hugging Face repo id ({e})") from None
    except OSError as e:  # offline or unreachable (LocalEntryNotFoundError, OfflineModeIsEnabled ...), not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub could not be reached ({_first_line(e)})"
        raise ValueError(f"model: {repo_id!r}{at} is not in the Hugging Face cache ({cache}) and "
                         f"{why}: {get_it}") from None
    except ValueError as e:  # diffusers' own refusals (a variant the repo does not have ...)
        raise ValueError(f"model: {repo_id!r}{at}: {_first_line(e)}") from None
    log.info("model %s%s: %s%s", repo_id, at, folder, " (HF_HUB_OFFLINE: the cached snapshot)" if constants.HF_HUB_OFFLINE else "")
    return folder


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
