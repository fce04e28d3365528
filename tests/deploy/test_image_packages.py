"""Each image installs every third-party package its component imports: the entry module and every
module of the repository it reaches, imports inside functions included (they run too, only later).

No Docker engine here, so the images are never built; this is what catches a component that gained
a dependency its Dockerfile does not install.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT
from tests.deploy.test_deploy_files import COMPONENTS, dockerfile

REPO_PACKAGES = {path.parent.name for path in ROOT.glob("*/__init__.py")}
APP_TARGET = re.compile(r"[a-z_][\w.]*:[a-z_]\w*\Z")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _source(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imported(module: str) -> set[str]:
    """Absolute names of what one module of the repository imports (maybe submodules, maybe not)."""
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    package = module if _source(module).name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and APP_TARGET.match(node.value):
            names.add(node.value.partition(":")[0])        # a server's "module:factory" target string
    return names


def third_party_imports(entry: str) -> set[str]:
    """Top-level third-party modules reachable from ``python -m entry``."""
    parts = entry.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if _source(f"{entry}.__main__"):
        todo.append(f"{entry}.__main__")
    seen, outside = set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imported(module):
            top = name.split(".")[0]
            if top in REPO_PACKAGES:
                if _source(name):
                    todo.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                outside.add(top)
    return outside


def installed_closure(text: str) -> set[str]:
    """The distributions ``pip install`` in the Dockerfile brings, with their dependencies."""
    command = re.search(r"pip install --constraint \S+ (.*?)\s*&&", text, re.DOTALL)
    todo = [_normal(name) for name in command.group(1).replace("\\", " ").split()]
    found = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_normal(requirement.name))
    return found


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_the_image_installs_every_package_its_component_imports(component):
    providers = metadata.packages_distributions()
    installed = installed_closure(dockerfile(component))
    missing = {module: providers.get(module, ["?"]) for module in third_party_imports(COMPONENTS[component])
               if not installed & {_normal(d) for d in providers.get(module, [])}}
    assert not missing, f"deploy/{component}/Dockerfile does not install what these imports need: {missing}"


def test_the_import_walk_sees_lazy_imports():
    # The collector imports granian only inside main(), and its app only as granian's target string
    # "collector.app:create_app"; a walk of module-level imports would miss both.
    assert {"granian", "click", "boto3", "orjson"} <= third_party_imports("collector")
    assert "onnxruntime" in third_party_imports("scorer")


def _repository_modules(entry: str) -> set[str]:
    """The repository's modules ``python -m entry`` can reach (the walk of ``third_party_imports``)."""
    parts = entry.split(".")
    todo, seen = [".".join(parts[:i]) for i in range(1, len(parts) + 1)], set()
    if _source(f"{entry}.__main__"):
        todo.append(f"{entry}.__main__")
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(name for name in _imported(module) if name.split(".")[0] in REPO_PACKAGES and _source(name))
    return seen


# Packages of requirements.lock that a library an image installs imports when present, and that the
# image may go without: what the library does without them is what the component gets anyway.
OPTIONAL_ELSEWHERE = {
    "certifi": "botocore uses its own CA bundle without it",
    "python-dotenv": "granian reads env files with it; the collector passes none",
    "pyyaml": "ua-parser loads custom YAML regexes with it; enrich uses the built-in ones",
    "cloudpickle": "pyarrow pickles Python objects with it; the lake loader writes none",
    "charset-normalizer": "numpy's f2py (Fortran wrapper generator) uses it; the trainer never runs f2py",
}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_the_image_installs_the_locked_packages_its_libraries_pick_up_when_present(component):
    # Some libraries change behind an import guarded by ImportError or find_spec: ua-parser matches
    # 40x faster with ua-parser-rs, granian serves on uvloop. The venv (tests, benchmarks, the docs'
    # figures) has every package of requirements.lock, so an image without one behaves otherwise.
    # Import what the component imports, in a fresh interpreter, and see what else got loaded.
    modules = sorted(m for m in _repository_modules(COMPONENTS[component]) | third_party_imports(COMPONENTS[component])
                     if not m.endswith("__main__"))
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, encoding="utf-8", timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    locked = {_normal(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines() if "==" in line}
    providers = metadata.packages_distributions()
    installed = installed_closure(dockerfile(component))
    missing = {_normal(dist): module for module in loaded for dist in providers.get(module, [])
               if _normal(dist) in locked and _normal(dist) not in installed and _normal(dist) not in OPTIONAL_ELSEWHERE}
    assert not missing, (f"deploy/{component}/Dockerfile does not install these pinned packages, which the "
                         f"component's libraries load here: {missing}")
