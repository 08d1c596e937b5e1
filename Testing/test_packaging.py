"""What ``pip install languageguidedseg`` and the Slicer module install: exactly what inference imports.

The core dependencies of ``pyproject.toml`` and the Slicer module's ``Resources/requirements.txt`` are the same set;
``lgseg segment`` / ``approximate`` / ``models`` on both shipped models import nothing outside that set (and the
packages it depends on); the engine modules that inference and the report loop use import, anywhere in their code,
only that set or an optional package that ``languageguidedseg.extras`` names with its extra.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import languageguidedseg
from conftest import QATA_REPORT, dataset
from languageguidedseg.extras import OPTIONAL_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
SLICER_REQUIREMENTS = ROOT / "LanguageGuidedSeg" / "Resources" / "requirements.txt"
ENGINE = Path(languageguidedseg.__file__).resolve().parent
# The report loop and the worker (the Slicer module's and the web page's run path), beyond what lgseg imports.
LOOP_MODULES = ("controller", "runner", "worker", "mrml", "parameters")
# The MRML library: the host's (3D Slicer, or slicer-core for the web page), used only by mrml.py's callers' scenes.
HOST_PACKAGES = {"slicer", "vtk", "vtkmodules"}
# Packages that the first pip install used to bring and that inference never imports.
NEVER_AT_RUNTIME = {"monai", "transformers", "sentence-transformers", "scikit-learn", "scipy", "openpyxl", "pillow"}


def _core() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def _extras() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {extra: {canonicalize_name(Requirement(r).name) for r in requirements}
            for extra, requirements in project["optional-dependencies"].items()}


def _closure(names) -> set[str]:
    """The distributions ``names`` need when installed: themselves and their dependencies, transitively."""
    done, pending = set(), list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in done:
            continue
        done.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return done


def _distributions_of(top_level: str) -> set[str]:
    return {canonicalize_name(d) for d in metadata.packages_distributions().get(top_level, [])}


def test_slicer_requirements_are_the_core_dependencies():
    lines = [line.split("#", 1)[0].strip() for line in SLICER_REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    slicer = {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}
    assert {n: str(r.specifier) for n, r in slicer.items()} == {n: str(r.specifier) for n, r in _core().items()}
    assert not NEVER_AT_RUNTIME & set(_core())


def test_every_optional_package_is_in_the_extra_its_message_names():
    extras = _extras()
    for module, (distribution, extra) in OPTIONAL_PACKAGES.items():
        assert canonicalize_name(distribution) in extras[extra], f"{distribution} is not in the [{extra}] extra"
        assert canonicalize_name(distribution) in extras["test"], f"the tests need {distribution}"
        assert canonicalize_name(distribution) in _distributions_of(module), f"{module} is not {distribution}'s"
        assert canonicalize_name(distribution) not in _core()


RUNS = """
import json, sys
from languageguidedseg.cli import main
for argv in {runs!r}:
    assert main(argv) == 0, argv
loaded = [(name, module) for name, module in list(sys.modules.items()) if module is not None]
print(json.dumps(sorted({{name.split(".")[0] for name, module in loaded
                          if getattr(module, "__file__", None) or hasattr(module, "__path__")}})))
"""


def test_inference_imports_only_the_runtime_packages(tmp_path):
    """``lgseg segment`` with and without a report on both shipped models, ``approximate`` and ``models``, in one
    fresh interpreter: every package it imports is the standard library, the engine, a core dependency or one that a
    core dependency needs (torch's typing_extensions, ...)."""
    qata = next(iter(sorted((dataset("qata-cov19") / "images").glob("*.png"))))
    kvasir = next(iter(sorted((dataset("kvasir-seg") / "images").glob("*.jpg"))))
    runs = [
        ["segment", str(qata), "--model", "qata-cxr", "--quiet", "-o", str(tmp_path / "a.png")],
        ["segment", str(qata), "--model", "qata-cxr", "--quiet", "--report", QATA_REPORT,
         "-o", str(tmp_path / "b.seg.nrrd")],
        ["segment", str(kvasir), "--model", "kvasir-polyp", "--quiet", "--report", "one polyp",
         "-o", str(tmp_path / "c.png")],
        ["approximate", str(kvasir), "--model", "kvasir-polyp"],
        ["models"],
    ]
    done = subprocess.run([sys.executable, "-c", RUNS.format(runs=runs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.splitlines()[-1])
    allowed = _closure(_core())
    outside = {}
    for name in imported:
        if name in sys.stdlib_module_names or name == "languageguidedseg":
            continue
        distributions = _distributions_of(name)
        if not distributions or not distributions <= allowed:
            outside[name] = sorted(distributions)
    assert not outside, f"inference imported packages outside the core dependencies: {outside}"
    used = set().union(*(_distributions_of(name) for name in imported))
    assert not used & NEVER_AT_RUNTIME
    assert {"torch", "safetensors", "tokenizers", "slicerio"} <= used  # the runs did what they should


def _imports(path: Path):
    """(top-level name, at module level?) of every absolute import in a file, in functions too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) not in inside


def test_runtime_modules_import_only_the_runtime_set_or_a_named_extra():
    """An AST scan (lazy imports inside functions included) of every engine module that the runs above and the
    report loop load: a package outside the core set is allowed only inside a function and only when
    ``languageguidedseg.extras`` names the extra that installs it (the command then says so in one line)."""
    done = subprocess.run([sys.executable, "-c", "import sys, languageguidedseg.cli, languageguidedseg.inference, "
                           + ", ".join(f"languageguidedseg.{m}" for m in LOOP_MODULES)
                           + "; print(' '.join(sorted(m for m in sys.modules if m.startswith('languageguidedseg'))))"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = done.stdout.split()
    runtime_names = {top for top, names in metadata.packages_distributions().items()
                     if {canonicalize_name(n) for n in names} & set(_core())}
    problems = []
    for module in modules:
        relative = module.split(".")[1:]
        path = ENGINE.joinpath(*relative)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for name, at_module_level in _imports(path):
            if name in sys.stdlib_module_names or name in runtime_names or name in HOST_PACKAGES \
                    or name == "languageguidedseg":
                continue
            if name in OPTIONAL_PACKAGES and not at_module_level:
                continue
            problems.append(f"{module}: {name}" + (" (at module level)" if at_module_level else ""))
    assert "languageguidedseg.worker" in modules and "languageguidedseg.text" in modules
    assert not problems, f"imports outside the runtime set without an extra: {problems}"


def test_a_command_missing_an_optional_package_names_its_extra(tmp_path):
    """``lgseg evaluate --corrupt`` without MONAI (blocked in a fresh interpreter): one line naming the [eval]
    extra, exit status 2; plain ``lgseg evaluate`` needs no MONAI."""
    kvasir = dataset("kvasir-seg")
    script = f"""
import sys
sys.modules["monai"] = None  # any import of it fails, as when it is not installed
from languageguidedseg.cli import main
common = [{str(kvasir)!r}, "--model", "kvasir-polyp", "--limit", "1", "--quiet", "--no-probes"]
assert main(["evaluate", *common]) == 0
print("status", main(["evaluate", *common, "--corrupt", "blur:2"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "status 2" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "error: lgseg evaluate: this needs the optional package 'monai'; install it with "
        "pip install 'languageguidedseg[eval]'")
