"""Versions of the libraries a benchmark ran with, for its record (quieting them: engine/models/libraries.py)."""

from __future__ import annotations


def package_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
