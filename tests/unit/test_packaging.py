"""Packaging: setup.cfg lists every package folder, and `import dfuse` stays light."""
import configparser
import os
import pathlib
import subprocess
import sys

import dfuse

REPO = pathlib.Path(__file__).resolve().parents[2]
_SKIP_TOP = {"tests", "build", ".venv", "dfuse.egg-info"}
_SKIP_PATHS = {pathlib.Path("bench", "results")}


def _package_folders() -> set[str]:
    packages = set()
    for folder, subfolders, files in os.walk(REPO):
        rel = pathlib.Path(folder).relative_to(REPO)
        subfolders[:] = [
            name for name in subfolders
            if not name.startswith(".") and name != "__pycache__" and not name.endswith(".egg-info")
            and not (rel == pathlib.Path(".") and name in _SKIP_TOP) and rel / name not in _SKIP_PATHS
        ]
        if "__init__.py" in files:
            packages.add(".".join(("dfuse", *rel.parts)))
    return packages


def test_setup_cfg_lists_every_package_folder():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = [line.strip() for line in config["options"]["packages"].splitlines() if line.strip()]
    assert len(listed) == len(set(listed)), f"duplicates in setup.cfg packages: {listed}"
    folders = _package_folders()
    assert "dfuse.engine.transport" in folders  # the walk does reach nested packages
    assert set(listed) == folders, (
        f"in setup.cfg but no such package folder: {sorted(set(listed) - folders)}; "
        f"package folders missing from setup.cfg: {sorted(folders - set(listed))}"
    )
    assert config["options"]["package_dir"].split() == ["dfuse", "=", "."]


def test_importing_dfuse_does_not_import_torch(tmp_path):
    # A fresh interpreter that imports *this* checkout as `dfuse` (through a link), whatever is installed.
    (tmp_path / "dfuse").symlink_to(REPO, target_is_directory=True)
    code = (
        "import sys, dfuse\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'zmq') if m in sys.modules)\n"
        "print(dfuse.__file__)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    path, heavy = result.stdout.split()
    assert pathlib.Path(path).resolve() == REPO / "__init__.py"
    assert heavy == "none", f"`import dfuse` loaded {heavy}"


def test_lazy_attributes_resolve_and_unknown_names_raise():
    assert dfuse.EngineConfig.__name__ == "EngineConfig"
    assert set(dfuse.__all__) == {"Engine", "EngineConfig", "BatchConfig", "ElasticConfig", "TransportConfig",
                                  "GenerationResult", "EngineStats", "EngineClosed", "RequestFailed", "RequestTimeout"}
    assert all(getattr(dfuse, name).__name__ == name for name in dfuse.__all__)
    # The README and error messages name these: each must be what EngineConfig itself takes.
    config = dfuse.EngineConfig(transport=dfuse.TransportConfig(slot_mib=32), batching=dfuse.BatchConfig(enabled=True),
                                elastic=dfuse.ElasticConfig())
    assert config.transport.slot_mib == 32 and config.batching.enabled
    try:
        dfuse.NoSuchThing
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("dfuse.NoSuchThing did not raise AttributeError")
