"""A Hugging Face cache folder made by hand, as huggingface_hub lays one out after a download
(models--OWNER--NAME/refs/main -> snapshots/COMMIT/...): the stand-in for the hub, which these
machines cannot reach. huggingface_hub serves repo ids from it offline."""

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache: Path, repo_id: str, folder: Path, variant: str | None = None) -> Path:
    """Put the diffusers `folder` in `cache` as `repo_id` at main; with `variant`, its weight files
    are renamed as diffusers names a variant's (model.fp16.safetensors). Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if variant:
        for weights in snapshot.rglob("*.safetensors"):
            weights.rename(weights.with_name(f"{weights.name.removesuffix('.safetensors')}.{variant}.safetensors"))
    return snapshot
