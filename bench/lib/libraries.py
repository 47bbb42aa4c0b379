"""diffusers and transformers as a benchmark needs them: silent, and their versions on record."""

from __future__ import annotations


def quiet_libraries() -> None:
    """No log lines or progress bars from diffusers and transformers (they would mix with ours)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def package_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
