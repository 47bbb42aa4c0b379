"""The package's layers go one way: each top-level part imports only the parts below it.

    cli.py  ->  bench/  ->  engine/  ->  scheduler/
      |           |           ^  ^
      |           +-> stages/ +  |   (workers use only what they share with the engine: engine.protocol,
      |                          |    engine.transport, engine.models, engine.devices, engine.cpu_affinity)
      +-> serve/ ----------------+   (the HTTP front on the Engine)

The engine starts workers by name (engine/launcher.py WORKER_ENTRY) and never imports stages/;
scheduler/ is pure logic and imports nothing of dfuse. Imports inside functions count too.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The allowed arrows, written once: part -> the parts it may import.
ALLOWED = {
    "scheduler": set(),
    "engine": {"scheduler"},
    "stages": {"engine", "scheduler"},
    "bench": {"engine", "scheduler", "stages"},
    "serve": {"engine", "scheduler"},
    "cli": {"bench", "serve", "engine", "scheduler", "config_file"},
    "config_file": set(),  # `--config FILE`: TOML onto click options, nothing of dfuse
}
# What a worker may take from the engine: the wire protocol, the transport, model metadata, device
# names, pinning.
STAGES_MAY_USE = ("engine.protocol", "engine.transport", "engine.models", "engine.devices", "engine.cpu_affinity")


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0].removesuffix(".py") in ALLOWED:
            yield rel


def _imports(root: Path, rel: Path):
    """(dotted module, imported names) for every import in `rel`, absolute (`dfuse.engine...`)."""
    package = ["dfuse", *rel.parts[:-1]]
    for node in ast.walk(ast.parse((root / rel).read_text(), str(rel))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _part(dotted: str) -> str | None:
    bits = dotted.split(".")
    return bits[1] if bits[0] == "dfuse" and len(bits) > 1 else None


def wrong_arrows(root: Path) -> dict[str, list[str]]:
    wrong = defaultdict(list)
    for rel in _modules(root):
        me = rel.parts[0].removesuffix(".py")
        for target, names in _imports(root, rel):
            # `from .. import engine` names the part in `names`
            parts = {_part(target)} if _part(target) else {_part(f"{target}.{n}") for n in names}
            for part in parts - {None, me}:
                if part not in ALLOWED[me]:
                    wrong[f"{me} -> {part}"].append(f"{rel}: {target}")
    return wrong


def test_layers_go_one_way():
    wrong = wrong_arrows(ROOT)
    assert not wrong, "imports against the layers:\n" + "\n".join(f"{k}: {v}" for k, v in wrong.items())


def test_the_check_catches_an_engine_module_importing_a_worker(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "x.py").write_text("def f():\n    from ..stages.worker import run_stage_worker\n")
    assert list(wrong_arrows(tmp_path)) == ["engine -> stages"]


def test_workers_use_only_what_they_share_with_the_engine():
    reaching = []
    for rel in _modules(ROOT):
        if rel.parts[0] != "stages":
            continue
        for target, names in _imports(ROOT, rel):
            if _part(target) != "engine":
                continue
            # `from ..engine import protocol` imports the module engine.protocol
            modules = [f"{target}.{n}" for n in names] if target == "dfuse.engine" else [target]
            reaching += [f"{rel}: {m}" for m in modules if not m.removeprefix("dfuse.").startswith(STAGES_MAY_USE)]
    assert reaching == []


def test_no_part_imports_another_parts_private_names():
    private = []
    for rel in _modules(ROOT):
        me = rel.parts[0].removesuffix(".py")
        for target, names in _imports(ROOT, rel):
            if _part(target) not in (None, me):
                private += [f"{rel}: {n} from {target}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []
