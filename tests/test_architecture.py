"""The import rules of ARCHITECTURE.md, checked on every module (imports inside functions too).

A layer may import the layers below it, never those above: api → models → engine → native.
chats stands beside them (only api and the wiring reach it), build is used by `pull` and
`import` alone, and the engine knows nothing of gRPC, the database or the model manager.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "tokenwire.server", "bridge": "tokenwire.bridge", "clients": "tokenwire.clients"}

# package -> the tokenwire.server packages (or single modules) it may import besides itself.
ALLOWED = {
    "tokenwire.server.native": set(),
    "tokenwire.server.engine": {"tokenwire.server.native", "tokenwire.server.metrics", "tokenwire.server.settings"},
    "tokenwire.server.models": {"tokenwire.server.engine", "tokenwire.server.native", "tokenwire.server.metrics",
                                "tokenwire.server.settings"},
    "tokenwire.server.chats": {"tokenwire.server.engine.records"},  # the shared vocabulary: Usage, ReplyStatus
    "tokenwire.server.build": {"tokenwire.server.engine", "tokenwire.server.models", "tokenwire.server.native"},
    "tokenwire.server.api": {"tokenwire.server.engine", "tokenwire.server.models", "tokenwire.server.chats",
                             "tokenwire.server.config", "tokenwire.server.settings", "tokenwire.server.errors"},
}
# Third-party packages that only some layers may import.
ONLY_IN = {
    "grpc": {"tokenwire.server.api", "tokenwire.server.app", "tokenwire.bridge", "tokenwire.clients"},
    "grpc_health": {"tokenwire.server.app", "tokenwire.bridge", "tokenwire.clients"},
    "grpc_reflection": {"tokenwire.server.app"},
    "tokenwire.v1": {"tokenwire.server.api", "tokenwire.server.app", "tokenwire.bridge", "tokenwire.clients"},
    "google.rpc": {"tokenwire.server.api", "tokenwire.bridge", "tokenwire.clients"},
    "peewee": {"tokenwire.server.chats"},
    "playhouse": {"tokenwire.server.chats"},
    "torch": {"tokenwire.server.build"},
    "transformers": {"tokenwire.server.build"},
    "optimum": {"tokenwire.server.build"},
    "onnx": {"tokenwire.server.build"},
    "aiohttp": {"tokenwire.bridge", "tokenwire.clients"},
    # Speech to text (the `voice` extra): the engine's transcriber only.
    "faster_whisper": {"tokenwire.server.engine.transcriber"},
    "ctranslate2": {"tokenwire.server.engine.transcriber"},
    "av": {"tokenwire.server.engine.transcriber"},
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for folder, dotted in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found.append((".".join([dotted, *parts]), path))
    return found


MODULES = _modules()


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `path` imports, absolute, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 else module


def violations(name: str, imported: set[str]) -> list[str]:
    wrong = []
    for target in sorted(imported):
        for prefix, allowed in ONLY_IN.items():
            if _within(target, prefix) and not any(_within(name, a) for a in allowed):
                wrong.append(f"{name} imports {target} (only {', '.join(sorted(allowed))} may)")
        own = _package_of(name)
        if _within(target, "tokenwire.server") and not _within(target, own):
            if _within(name, "tokenwire.bridge") and not _within(target, "tokenwire.server.settings"):
                wrong.append(f"{name} imports {target}: the bridge talks to the server over gRPC only")
            allowed = ALLOWED.get(own)
            if (allowed is not None and not any(_within(target, a) for a in allowed)
                    and target not in FOLDERS.values()):
                wrong.append(f"{name} imports {target} ({own} may import only {', '.join(sorted(allowed)) or 'itself'})")
        serving = _within(name, "tokenwire.server") and not _within(name, "tokenwire.server.build")
        if serving and _within(target, "tokenwire.server.build"):
            wrong.append(f"{name} imports {target}: serving code never imports the build package")
    return wrong


def test_every_module_is_checked() -> None:
    names = {name for name, _ in MODULES}
    for package in ALLOWED:
        assert package in names, f"{package} is missing: update ARCHITECTURE.md and this test together"


@pytest.mark.parametrize("name,path", MODULES, ids=[name for name, _ in MODULES])
def test_imports_follow_the_layers(name: str, path: Path) -> None:
    assert violations(name, imports_of(name, path)) == []


def test_the_check_catches_what_it_forbids(tmp_path: Path) -> None:
    """The rules themselves, on imports that must be refused."""
    assert violations("tokenwire.server.engine.scheduler", {"grpc"})
    assert violations("tokenwire.server.engine.scheduler", {"peewee"})
    assert violations("tokenwire.server.engine.scheduler", {"tokenwire.server.models.manager"})
    assert violations("tokenwire.server.models.manager", {"tokenwire.server.build.pull"})
    assert violations("tokenwire.server.api.inference", {"tokenwire.server.build.fast_graph"})
    assert violations("tokenwire.server.chats.store", {"tokenwire.v1.inference_pb2"})
    assert violations("tokenwire.server.chats.store", {"tokenwire.server.engine.scheduler"})
    assert not violations("tokenwire.server.chats.store", {"tokenwire.server.engine.records"})
    assert violations("tokenwire.bridge.app", {"tokenwire.server.models.store"})
    assert not violations("tokenwire.server.engine.scheduler", {"tokenwire.server.engine.sequence", "numpy"})
    assert not violations("tokenwire.server.build.pull", {"tokenwire.server.models.store"})
    probe = tmp_path / "probe.py"
    probe.write_text("from ..models import manager\nfrom .sampling import sample\n")
    found = imports_of("tokenwire.server.engine.probe", probe)
    assert {"tokenwire.server.models.manager", "tokenwire.server.engine.sampling"} <= found
    assert violations("tokenwire.server.engine.probe", found)


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists packages explicitly: a new folder missing from the list would import in
    the editable checkout and be absent from a real install (a wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {dotted for dotted, path in MODULES if path.name == "__init__.py"} | {"tokenwire", "tokenwire.v1"}
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"
