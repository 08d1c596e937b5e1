"""Checks of the Slicer module that need no Slicer application.

Static checks: the .ui parses and holds every widget the module uses, the module files import nothing heavy at file
scope, every module file is listed in CMake, and the catalog entry matches the CMake project; the CMake packaging is
configured, built and installed against a stand-in for Slicer's CMake macros.

Then the module runs on Slicer's own Python layer of three releases (5.8.1, 5.10.0, 5.12.3, in ../shared/slicer-python):
``slicer-core`` provides ``slicer.util`` and the MRML classes, the release folder is appended to ``slicer.__path__``,
and ``ScriptedLoadableModule``, ``parameterNodeWrapper``, ``i18n`` and ``packaging`` are that release's own code. What
exists only inside the Slicer application stands in, as bare names that Slicer's code needs at import time and
nothing else: the ``qt`` and ``ctk`` modules (PythonQt) with the class names in ``IMPORT_NAMES`` and the
application's widget class ``slicer.qMRMLNodeComboBox``. The Qt widget itself (``LanguageGuidedSegWidget``) cannot be
instantiated here; everything it wires is tested through the controller and the library classes. Two tests stand in
for the parts of the application they need: ``slicer.app`` (the worker process test) and ``slicer.modules`` with the
module's widget representation (the Reload test).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LanguageGuidedSeg"
MODULE_FILE = MODULE_DIR / "LanguageGuidedSeg.py"
LIB_DIR = MODULE_DIR / "LanguageGuidedSegLib"
MODULE_SOURCES = [MODULE_FILE] + sorted(LIB_DIR.glob("*.py"))
ENGINE_DIR = ROOT / "Logic" / "languageguidedseg"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LanguageGuidedSeg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG = ROOT / "LanguageGuidedSeg.json"

# Folders under LanguageGuidedSeg/ that are not shipped with the module: build-time tests (their own CMake files)
# and documentation pictures.
NOT_PACKAGED = ("Testing/", "Resources/Screenshots/")
LIGHT_MODULES = {"slicer", "qt", "ctk", "vtk", "__future__", "LanguageGuidedSegLib", "<relative>"}
HEAVY_MODULES = ("torch", "monai", "transformers", "safetensors", "sklearn", "SimpleITK")
# The engine's modules that loading the module imports: the parameter node is built from the engine's declaration of
# the parameters, which is plain Python.
ENGINE_AT_LOAD = ["languageguidedseg", "languageguidedseg.parameters"]
# Fields of the catalog entry schema v1.0.1 (additionalProperties: false) and the required ones.
CATALOG_FIELDS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                  "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


# ----------------------------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------------------------


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _ui_widgets() -> dict:
    """Widget (and layout) name -> class, from the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    names = {w.get("name"): w.get("class") for w in root.iter("widget")}
    names.update({layout.get("name"): layout.get("class") for layout in root.iter("layout") if layout.get("name")})
    return names


def _ui_bound_parameters() -> dict:
    """SlicerParameterName -> widget class, from the .ui file."""
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    return bound


def _cmake_set(text: str, variable: str) -> list:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def _cmake_project(text: str) -> str:
    match = re.search(r"^\s*project\(\s*(\w+)", text, re.M)
    assert match, "project(...) not found"
    return match.group(1)


def _cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"?([^")]*)"?\s*\)', text)
    assert match, f"set({variable} ...) not found"
    return match.group(1)


# ----------------------------------------------------------------------------------------------------------------
# Static checks
# ----------------------------------------------------------------------------------------------------------------


def test_ui_parses_and_holds_every_widget_the_module_uses():
    widgets = _ui_widgets()
    root = ET.parse(UI_FILE).getroot()
    assert root.find("class").text == "LanguageGuidedSeg"
    assert widgets["LanguageGuidedSeg"] == "qMRMLWidget"

    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module should use its .ui widgets"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by the module but missing from the .ui: {missing}"

    custom = {c.find("class").text for c in root.iter("customwidget")}
    qt_classes = {name for name in widgets.values() if name.startswith("Q")}
    assert set(widgets.values()) - qt_classes <= custom, "every non-Qt widget class must be a declared customwidget"
    for connection in root.iter("connection"):
        assert connection.find("sender").text in widgets
        assert connection.find("receiver").text in widgets


def test_ui_binds_every_parameter_to_a_fitting_widget():
    """Bound names are parameters (declared in ``languageguidedseg.parameters``, which the wrapper is built from), and
    each widget type has a parameterNodeWrapper connector."""
    from languageguidedseg.parameters import parameter_fields

    parameters = parameter_fields()
    bound = _ui_bound_parameters()
    assert set(bound) <= set(parameters), f"unknown parameters in the .ui: {set(bound) - set(parameters)}"
    assert {"inputVolume", "outputSegmentation", "scope", "sliceView", "threshold", "device", "sides",
            "liveUpdate"} <= set(bound)
    # The report box is synced by hand: the wrapper's QTextEdit connector calls setPlainText on every parameter
    # change (guiConnectors.py, 5.8.1 to 5.12.3), which moves the cursor to the start while the user types.
    assert "report" not in bound
    for name, widget_class in bound.items():
        parameter = parameters[name]
        if parameter.node_classes:
            assert widget_class == "qMRMLNodeComboBox", name
        elif parameter.choices:
            assert widget_class == "QComboBox", name
        elif parameter.type is bool:
            assert widget_class == "QCheckBox", name
        elif parameter.type is float:
            assert widget_class in ("ctkSliderWidget", "QDoubleSpinBox"), name
            assert parameter.value_range, f"a slider needs a bounded float: {name}"


def _statements_run_at_import(tree: ast.Module):
    """Every statement executed when the file is imported: module level and class bodies, not function bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                stack.append(child)


def test_module_imports_only_slicer_qt_vtk_and_stdlib_at_file_scope():
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or {"os", "sys", "typing", "logging", "json"}
    offending = []
    nodes = [n for path in MODULE_SOURCES for n in _statements_run_at_import(ast.parse(path.read_text()))]
    for node in nodes:
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [(node.module or "").split(".")[0]] if node.level == 0 else ["<relative>"]
        else:
            continue
        offending += [f"line {node.lineno}: {r}" for r in roots if r not in LIGHT_MODULES | stdlib]
    assert not offending, f"heavy or third-party imports at file scope: {offending}"


def _engine_file(name: str):
    """The source file of engine module ``name`` ("languageguidedseg.x.y"), or None when it is no module."""
    path = ENGINE_DIR.joinpath(*name.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _engine_imports(path: Path) -> set:
    """The engine modules a file imports anywhere in it (function bodies too): ``import languageguidedseg.x``,
    ``from languageguidedseg.x import ...``, relative imports inside the engine, and the module's
    ``importEngine("x")``."""
    package = None
    if path.is_relative_to(ENGINE_DIR):
        package = ".".join(("languageguidedseg",) + path.parent.relative_to(ENGINE_DIR).parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level and package is None:
                continue  # the module's own library, checked file by file
            base = (package.rsplit(".", node.level - 1)[0] if node.level > 1 else package) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "importEngine":
            arguments = node.args + [keyword.value for keyword in node.keywords]
            names.add(".".join(filter(None, ["languageguidedseg"] + [a.value for a in arguments[:1]])))
    engine = {name for name in names if name.split(".")[0] == "languageguidedseg"}
    # Importing a module imports its packages too.
    return engine | {name.rsplit(".", depth)[0] for name in engine for depth in range(1, name.count(".") + 1)}


def _files_that_run_inside_slicer() -> list:
    """The module's files and every engine module that they or the worker process import, transitively."""
    files = sorted(MODULE_DIR.rglob("*.py"))
    todo = [p for p in files if "Testing" not in p.relative_to(MODULE_DIR).parts] + [ENGINE_DIR / "worker.py"]
    seen = set(todo)
    while todo:
        for name in _engine_imports(todo.pop()):
            path = _engine_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return sorted(seen | set(files))


def test_every_file_that_runs_inside_slicer_parses_for_python_3_9():
    """Slicer 5.8 ships Python 3.9.10: the module, its tests and the engine modules that the module and the worker
    process import (found by following their imports) use no newer syntax."""
    files = _files_that_run_inside_slicer()
    engine = {p.relative_to(ENGINE_DIR).as_posix() for p in files if p.is_relative_to(ENGINE_DIR)}
    # What the module and the worker import at least: the closure does follow imports.
    assert {"__init__.py", "worker.py", "runner.py", "controller.py", "inference.py", "mrml.py", "parameters.py",
            "network.py", "text.py"} <= engine
    for path in files:
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        except SyntaxError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} does not parse for Python 3.9 (Slicer 5.8): {exc}")


def test_widget_dispatches_every_controller_event_it_names_to_a_handler():
    """The widget maps the controller's events (``LoopEvent``) to its handlers; it cannot be instantiated here, so its
    source is read: every event it names exists, and it handles each one a front end must show."""
    from languageguidedseg.controller import LoopEvent

    named = {node.attr for node in ast.walk(_module_tree()) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Name) and node.value.id == "LoopEvent"}
    assert named <= set(LoopEvent.__members__), f"no such events: {named - set(LoopEvent.__members__)}"
    assert {"RUNNING", "PROGRESS", "STATUS", "REPORT", "PENDING", "RESULT", "ERROR", "WARNINGS"} <= named


def test_warnings_sit_beside_the_report_box_hidden_until_there_is_one():
    """Issue 25: the warnings label and "Segment anyway" are in the report section, right below the report status,
    hidden at first (the widget shows them from the controller's ``warnings``), and not in a dialog."""
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    for name, cls in (("warningsLabel", "QLabel"), ("segmentAnywayButton", "QPushButton")):
        assert widgets[name].get("class") == cls
        visible = {prop.get("name"): prop for prop in widgets[name].findall("property")}["visible"]
        assert visible.find("bool").text == "false", f"{name} must be hidden until there is a warning"
    grid_rows = {}
    for item in root.iter("item"):
        names = {w.get("name") for w in item.iter("widget")}
        if item.get("row") is not None:
            for name in names:
                grid_rows.setdefault(name, int(item.get("row")))
    assert grid_rows["warningsLabel"] == grid_rows["reportStatusLabel"] + 1
    assert widgets["inputsCollapsibleButton"].find(".//widget[@name='warningsLabel']") is not None
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "segmentAnywayButton.connect(" in source and "segment_anyway()" in source


def test_every_module_file_is_listed_in_cmake():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    module_name = _cmake_value(text, "MODULE_NAME")
    assert module_name == "LanguageGuidedSeg"
    listed = {
        entry.replace("${MODULE_NAME}", module_name)
        for entry in _cmake_set(text, "MODULE_PYTHON_SCRIPTS") + _cmake_set(text, "MODULE_PYTHON_RESOURCES")
    }
    for entry in listed:
        assert (MODULE_DIR / entry).is_file(), f"CMake lists {entry}, which does not exist"
    files = {
        path.relative_to(MODULE_DIR).as_posix()
        for path in MODULE_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.name != "CMakeLists.txt"
    }
    shipped = {f for f in files if not f.startswith(NOT_PACKAGED)}
    missing = sorted(shipped - listed)
    assert not missing, f"module files not listed in {MODULE_CMAKE.name} (they would not be packaged): {missing}"
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()
    # The engine is packaged from the repository's Logic/ folder, models included (globbed).
    assert "../Logic/${ENGINE_PACKAGE}" in text and "GLOB_RECURSE" in text


def test_catalog_entry_names_the_cmake_project():
    top = TOP_CMAKE.read_text(encoding="utf-8")
    project = _cmake_project(top)
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    # The catalog names an extension by its file name, which must equal the CMake project name.
    assert CATALOG.stem == project == "LanguageGuidedSeg"
    assert not project.startswith("Slicer"), "catalog rule: the extension name must not start with 'Slicer'"
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_FIELDS
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1"
    )
    assert entry["category"] == _cmake_value(top, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == [_cmake_value(top, "EXTENSION_DEPENDS")] == ["PyTorch"]
    repository = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repository == "Slicer" + project, "catalog rule: the repository name is Slicer + extension name"
    assert entry.get("tier") in (1, 3, 5)
    assert re.search(r"add_subdirectory\(\s*LanguageGuidedSeg\s*\)", top)
    # The package carries this repository's licence and readme, not Slicer's defaults.
    for variable, name in (("EXTENSION_LICENSE_FILE", "LICENSE"), ("EXTENSION_README_FILE", "README.md")):
        assert _cmake_value(top, variable) == "${CMAKE_CURRENT_SOURCE_DIR}/" + name
        assert (ROOT / name).is_file()
    for include in ("Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert include in top


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "LanguageGuidedSeg.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


# ----------------------------------------------------------------------------------------------------------------
# CMake packaging, against a stand-in for Slicer's CMake macros
# ----------------------------------------------------------------------------------------------------------------

FAKE_SLICER_CONFIG = r"""
# Stand-in for SlicerConfig.cmake: just enough to configure, build and install a scripted-module extension.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/empty.cmake")
set(FAKE_SLICER_TESTS "" CACHE INTERNAL "")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_WITH_GENERIC_TESTS)
    message(FATAL_ERROR "WITH_GENERIC_TESTS missing")
  endif()
  set(_outputs)
  foreach(_file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
      message(FATAL_ERROR "listed file does not exist: ${_file}")
    endif()
    set(_target "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${_file}")
    add_custom_command(OUTPUT "${_target}"
      COMMAND ${CMAKE_COMMAND} -E copy "${CMAKE_CURRENT_SOURCE_DIR}/${_file}" "${_target}"
      DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
    list(APPEND _outputs "${_target}")
    get_filename_component(_dir "${_file}" DIRECTORY)
    install(FILES "${CMAKE_CURRENT_SOURCE_DIR}/${_file}"
      DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_dir}")
  endforeach()
  add_custom_target(Copy${MY_NAME}PythonFiles ALL DEPENDS ${_outputs})
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  set(FAKE_SLICER_TESTS "${FAKE_SLICER_TESTS};${MY_SCRIPT}" CACHE INTERNAL "")
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_packages_module_and_engine_with_models(tmp_path):
    """Configure, build and install the extension: the module, its resources and the engine land side by side."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(TOP_CMAKE, source / "CMakeLists.txt")
    for name in ("LICENSE", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(MODULE_DIR, source / "LanguageGuidedSeg", ignore=shutil.ignore_patterns("__pycache__"))
    engine = source / "Logic" / "languageguidedseg"
    shutil.copytree(ROOT / "Logic" / "languageguidedseg", engine, ignore=shutil.ignore_patterns("__pycache__"))
    # A model package and build litter, to check that models are shipped and litter is not.
    (engine / "models" / "demo").mkdir(parents=True, exist_ok=True)
    (engine / "models" / "demo" / "model.json").write_text("{}")
    (engine / "models" / "demo" / "model.safetensors").write_bytes(b"\0" * 16)
    (engine / "__pycache__").mkdir(exist_ok=True)
    (engine / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"\0")
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (fake / "empty.cmake").write_text("")

    build, prefix = tmp_path / "build", tmp_path / "install"

    def run(*args):
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run("cmake", "-S", str(source), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON")
    run("cmake", "--build", str(build))
    run("cmake", "--install", str(build), "--prefix", str(prefix))

    expected_engine = sorted(
        p.relative_to(engine).as_posix() for p in engine.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for tree in (build, prefix):
        modules = tree / "lib" / "Slicer-5.8" / "qt-scripted-modules"
        for name in ("LanguageGuidedSeg.py", "LanguageGuidedSegLib/__init__.py", "Resources/UI/LanguageGuidedSeg.ui",
                     "Resources/Icons/LanguageGuidedSeg.png", "Resources/requirements.txt"):
            assert (modules / name).is_file(), f"{name} missing from {tree.name}"
        shipped = sorted(
            p.relative_to(modules / "languageguidedseg").as_posix()
            for p in (modules / "languageguidedseg").rglob("*") if p.is_file()
        )
        assert shipped == expected_engine, f"engine files in the {tree.name} tree differ"
        assert "models/demo/model.safetensors" in shipped
    cache = (build / "CMakeCache.txt").read_text()
    assert "LanguageGuidedSeg.py" in cache.split("FAKE_SLICER_TESTS:INTERNAL=")[1].splitlines()[0]


# ----------------------------------------------------------------------------------------------------------------
# The module on Slicer's own Python layer, three releases
# ----------------------------------------------------------------------------------------------------------------

SLICER_PYTHON = ROOT.parent / "shared" / "slicer-python"
RELEASES = ("5.8.1", "5.10.0", "5.12.3")
# PythonQt's modules do not exist outside the Slicer application. Slicer's Python layer only needs these class names
# while it is imported (type annotations and isinstance checks of its GUI connectors, checked on the three
# releases); they are bare names, nothing in them runs.
IMPORT_NAMES = {
    "qt": ("QColor", "QLabel", "QLineEdit", "QPushButton", "QTextEdit", "QWidget"),
    "ctk": ("ctkCheckablePushButton", "ctkColorPickerButton", "ctkDirectoryButton", "ctkPathLineEdit"),
}
APPLICATION_WIDGET_NAMES = ("qMRMLNodeComboBox",)  # a Qt widget class of the application, named in guiConnectors.py
RELEASE_MODULES = ("ScriptedLoadableModule", "parameterNodeWrapper", "i18n", "packaging", "util")


def _names_module(name: str, names) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in for PythonQt's '{name}': class names needed at import time only")
    for class_name in names:
        setattr(module, class_name, type(class_name, (), {"__module__": name}))
    return module


def _in_release_folders(path) -> bool:
    """Whether ``path`` lies in ../shared/slicer-python, compared resolved: ../shared may be a symbolic link."""
    return bool(path) and Path(path).resolve().is_relative_to(SLICER_PYTHON.resolve())


def _unload_release() -> None:
    """Forget the release's modules, the module under test and the stand-ins, so that the next release loads fresh
    (each release registers its own serializers and connectors at import)."""
    import slicer

    for name in list(sys.modules):
        module = sys.modules[name]
        from_release = name.startswith("slicer.") and _in_release_folders(getattr(module, "__file__", None))
        if from_release or name in ("qt", "ctk", "LanguageGuidedSeg") or name.startswith("LanguageGuidedSegLib"):
            del sys.modules[name]
            if from_release and name.count(".") == 1 and hasattr(slicer, name.split(".")[1]):
                delattr(slicer, name.split(".")[1])
    for name in APPLICATION_WIDGET_NAMES + ("selfTests",):
        if name in vars(slicer):
            delattr(slicer, name)
    slicer.__path__[:] = [p for p in slicer.__path__ if not _in_release_folders(p)]
    while str(MODULE_DIR) in sys.path:
        sys.path.remove(str(MODULE_DIR))


def _load_release(release: str) -> types.ModuleType:
    """Load ``LanguageGuidedSeg.py`` the way Slicer does, on ``release``'s Python layer over slicer-core's MRML."""
    import slicer

    folder = SLICER_PYTHON / release / "slicer"
    _unload_release()
    slicer.__path__.append(str(folder))
    for name, names in IMPORT_NAMES.items():
        sys.modules[name] = _names_module(name, names)
    for name in APPLICATION_WIDGET_NAMES:
        setattr(slicer, name, type(name, (), {"__module__": "slicer"}))
    sys.path.insert(0, str(MODULE_DIR))  # Slicer puts the scripted modules' folder on sys.path
    module = importlib.import_module("LanguageGuidedSeg")
    for name in ("ScriptedLoadableModule", "parameterNodeWrapper", "i18n"):
        loaded = sys.modules[f"slicer.{name}"].__file__
        assert loaded.startswith(str(folder)), f"slicer.{name} came from {loaded}, not from Slicer {release}"
    return module


@pytest.fixture(scope="module", params=RELEASES)
def release(request):
    """(release name, the module loaded on that release's Python layer)."""
    pytest.importorskip("slicer")
    if not (SLICER_PYTHON / request.param / "slicer").is_dir():
        pytest.skip(f"Slicer {request.param}'s Python layer not found in {SLICER_PYTHON}")
    try:
        yield request.param, _load_release(request.param)
    finally:
        _unload_release()


@pytest.fixture
def scene(monkeypatch):
    """A real MRML scene as ``slicer.mrmlScene`` (what the application provides)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    yield scene
    scene.Clear(1)


def _lib(name: str) -> types.ModuleType:
    return sys.modules[f"LanguageGuidedSegLib.{name}"]


def test_parameter_node_round_trips_through_slicers_serializers(release, scene, tmp_path):
    """Created on a real vtkMRMLScriptedModuleNode; every field round-trips (node references to a scalar and a
    vector volume and None included), invalid values are refused, and a saved .mrml scene reads back intact."""
    import slicer

    name, module = release
    node = module.LanguageGuidedSegLogic().getParameterNode()
    assert node.parameterNode.IsA("vtkMRMLScriptedModuleNode") and node.parameterNode.GetScene() is scene
    assert node.inputVolume is None and node.outputSegmentation is None
    # The model "auto" (issue 25): the installed model made for the input.
    assert (node.model, node.scope, node.sliceView, node.report, node.reportSource) == ("auto", "slice", "Red", "", "")
    assert (node.threshold, node.device, node.sides, node.liveUpdate) == (0.5, "auto", "patient", True)

    scalar = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colonoscopy")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")
    for value in (vector, None, scalar):
        node.inputVolume = value
        assert node.inputVolume is value
    node.outputSegmentation = segmentation
    values = {"model": "qata-cxr", "scope": "volume", "sliceView": "Green",
              "report": "bilateral pulmonary infection, two infected areas, lower left lung.",
              "reportSource": "prototype", "reportSimilarity": 0.625, "approximationDigest": "ab" * 32,
              "threshold": 0.35, "device": "cpu", "sides": "image", "liveUpdate": False}
    for key, value in values.items():
        setattr(node, key, value)
        assert getattr(node, key) == value, key
    for key, bad in (("scope", "everything"), ("sliceView", "Blue"), ("threshold", 1.5), ("device", "tpu"),
                     ("sides", "left"), ("reportSource", "typed"), ("inputVolume", segmentation)):
        with pytest.raises((ValueError, TypeError)):
            setattr(node, key, bad)
    # Read back through the serializers (a new wrapper has no cached values).
    again = module.LanguageGuidedSegParameterNode(node.parameterNode)
    assert {key: getattr(again, key) for key in values} == values
    assert again.inputVolume is scalar and again.outputSegmentation is segmentation

    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit(), f"Slicer {name}: the scene could not be saved"
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Import(), f"Slicer {name}: the saved scene could not be read"
    slicer.mrmlScene = loaded
    try:
        read = module.LanguageGuidedSegLogic().getParameterNode()
        assert read.parameterNode.GetScene() is loaded and read.parameterNode.GetID() == node.parameterNode.GetID()
        assert {key: getattr(read, key) for key in values} == values
        assert read.inputVolume.GetName() == "ct" and read.inputVolume.GetScene() is loaded
        assert read.inputVolume.IsA("vtkMRMLScalarVolumeNode") and read.outputSegmentation.GetName() == "segments"
    finally:
        slicer.mrmlScene = scene
        loaded.Clear(1)


def test_parameter_node_agrees_with_the_controllers_parameters(release, scene):
    """The parameter node that the release's parameterNodeWrapper builds (its own per-parameter info: base type,
    default, Choice and WithinRange validators, node classes) and the controller's ``ReportLoopParameters`` (its
    dataclass fields, with the allowed values declared beside them) have the same names, and for each the same type,
    default, choices, range and node classes; a new parameter node holds the dataclass's defaults."""
    import dataclasses
    import typing

    from languageguidedseg.parameters import ReportLoopParameters, parameter_fields

    _, module = release
    wrapper = sys.modules["slicer.parameterNodeWrapper"]

    def slicer_side(info):
        base = wrapper.unannotatedType(info.unalteredType)
        validators = info.serializer.validators
        # Beyond the type checks that the serializers add, only the validators compared below.
        assert all(isinstance(v, (wrapper.Choice, wrapper.WithinRange, wrapper.IsInstance, wrapper.NotNone))
                   for v in validators)
        nodes = wrapper.getNodeTypes(base) if wrapper.isNodeOrUnionOfNodes(base) else ()
        choices = tuple(c for v in validators if isinstance(v, wrapper.Choice) for c in v.choices)
        bounds = [(v.minimum, v.maximum) for v in validators if isinstance(v, wrapper.WithinRange)]
        return typing.Any if nodes else base, info.default.value, choices, bounds[0] if bounds else None, nodes

    declared = parameter_fields()
    controller_side = {
        f.name: (f.type, f.default, declared[f.name].choices, declared[f.name].value_range,
                 declared[f.name].node_classes)
        for f in dataclasses.fields(ReportLoopParameters)
    }
    built = {name: slicer_side(info) for name, info in module.LanguageGuidedSegParameterNode.allParameters.items()}
    assert built == controller_side

    node = module.LanguageGuidedSegParameterNode(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    assert {name: getattr(node, name) for name in built} == dataclasses.asdict(ReportLoopParameters())


def test_module_file_loads_without_torch_and_only_the_engines_parameters(release):
    """Loading the module file, its library and the parameter node imports no heavy package (checked in a fresh
    interpreter where they cannot be imported), and of the engine only its declaration of the parameters."""
    name, _ = release
    script = f"""
import sys
for blocked in {list(HEAVY_MODULES)!r}:
    sys.modules[blocked] = None  # any import of these fails
sys.path.insert(0, {str(Path(__file__).parent)!r})
import slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
import test_slicer_module as checks
module = checks._load_release({name!r})
node = module.LanguageGuidedSegLogic().getParameterNode()
assert node.report == "" and node.inputVolume is None
print("loaded", sorted(m for m in {list(HEAVY_MODULES)!r} if sys.modules.get(m) is not None))
print("engine", sorted(m for m in sys.modules if m.split(".")[0] == "languageguidedseg"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded []" in done.stdout
    assert f"engine {ENGINE_AT_LOAD}" in done.stdout


def test_self_test_passes_and_fails_when_the_report_loop_cannot_run(release, scene, caplog):
    """The module's own self-test, as "Reload and Test" runs it (``runTest``): it passes on the real engine, and
    when a dependency of the report loop is missing it fails, naming it (never a skip)."""
    name, module = release
    logic = _lib("SegmentationLogic")
    runtime = logic.RUNTIME_MODULES
    logic.RUNTIME_MODULES = ("torch", "lgseg_not_installed")
    try:
        with pytest.raises(AssertionError, match="test_ReportLoopOnSyntheticVolume failed") as failed:
            module.LanguageGuidedSegTest().runTest()
    finally:
        logic.RUNTIME_MODULES = runtime
    assert "the report loop cannot run" in str(failed.value) and "lgseg_not_installed" in str(failed.value)

    with caplog.at_level(logging.INFO):
        module.LanguageGuidedSegTest().runTest()
    assert "2 run, all passed" in caplog.text


def _volume_in_the_red_view(scene):
    """A small synthetic volume, its slice 1 shown in Slicer's Red (axial) view."""
    import numpy as np
    import slicer

    from languageguidedseg import mrml

    volume = slicer.util.addVolumeFromArray(np.full((3, 32, 40), 100, dtype=np.int16), name="synthetic")
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    red.SetSingletonTag("Red")
    scene.AddNode(red)
    red.SetSliceToRASByNTP(0, 0, 1, 1, 0, 0, 0, 0, 0, 0)  # axial (the presets are the application's)
    red.JumpSliceByCentering(*(mrml.ijk_to_ras_matrix(volume) @ [20, 16, 1, 1])[:3])
    return volume


def test_logic_segments_through_the_controller_on_the_parameter_node(release, scene, tiny_model):
    """The module's logic and controller on the release's real parameter node: a slice run in the Red view fills
    the report box through the parameter node and writes the segment."""
    _, module = release
    volume = _volume_in_the_red_view(scene)
    logic = module.LanguageGuidedSegLogic()
    node = logic.getParameterNode()
    node.inputVolume, node.model, node.device = volume, str(tiny_model), "cpu"
    controller = logic.createController(node)
    controller.run()
    controller.wait(120)
    result = controller.last_result
    assert result is not None and (result.axis, result.slice_index) == (2, 1)
    assert node.reportSource == "prototype" and node.report == result.report
    assert node.outputSegmentation is result.segmentation_node
    assert controller.report_status().kind == "approximated"


def test_logic_process_holds_back_an_image_outside_the_models_domain_unless_asked(release, scene, kvasir):
    """Issue 25 for scripts: a colonoscopy frame with the chest X-ray model and no report writes nothing and says why
    in one line; ``segmentAnyway=True`` writes the mask, with no approximated report and the warning in the result."""
    from languageguidedseg import mrml
    from languageguidedseg.data import load_split
    from languageguidedseg.errors import LgsegError
    from languageguidedseg.imageio import read_image

    _, module = release
    path = load_split(kvasir, "val", validate=False)[0].image_path
    frame = mrml.add_volume_node(scene, read_image(path), "frame", source=path)
    logic = module.LanguageGuidedSegLogic()
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(LgsegError, match=r"^nothing was segmented: this image does not look like a frontal chest "
                                         r"X-ray .*; give a report, or pass segmentAnyway=True$"):
        logic.process(frame, model="qata-cxr", device="cpu")
    assert scene.GetNumberOfNodes() == nodes
    result = logic.process(frame, model="qata-cxr", device="cpu", segmentAnyway=True)
    assert result.in_domain is False and result.report == "" and result.domain_warning
    assert result.segmentation_node is not None and result.model == "qata-cxr"
    chosen = logic.process(frame, model="auto", device="cpu")
    assert chosen.model == "kvasir-polyp" and chosen.in_domain is True and chosen.report


def test_apply_cancels_only_a_running_apply_in_both_scopes(release, scene, segmenter):
    """Apply means one thing (the widget labels its button by the controller's ``apply_cancels``): while an Apply
    runs (in slice and volume scope, from the moment it starts loading the model) the button is Cancel and cancels
    it, and typing meanwhile never cancels it; while a live update runs, Apply queues after it and cancels
    nothing."""
    from languageguidedseg.controller import LoopEvent
    from languageguidedseg.runner import ThreadRunner

    _, module = release
    logic = module.LanguageGuidedSegLogic()
    node = logic.getParameterNode()
    node.inputVolume, node.device, node.model = _volume_in_the_red_view(scene), "cpu", ""  # the default model
    events = []
    controller = logic.createController(node, runner=ThreadRunner(lambda model, device: segmenter), debounce_s=0.0)
    controller.add_observer(lambda event, payload: events.append(event))
    for scope in ("slice", "volume"):
        node.scope = scope
        events.clear()
        assert not controller.apply_cancels
        controller.apply()
        assert controller.run_kind == "apply" and controller.apply_cancels
        controller.set_report(f"left lung, {scope}")  # typing: a live update waits for the Apply
        assert controller.apply_cancels and LoopEvent.CANCELLED not in events
        controller.apply()  # the button says Cancel
        controller.wait(60)
        assert LoopEvent.CANCELLED in events and LoopEvent.RESULT not in events, scope
        assert not controller.apply_cancels

    node.scope = "slice"
    controller.set_report("right lung")
    controller.poll()
    assert controller.run_kind == "live" and not controller.apply_cancels
    events.clear()
    controller.apply()  # the button says Apply: it runs once the live update has stopped
    controller.wait(60)
    assert events.count(LoopEvent.RESULT) == 1 and LoopEvent.CANCELLED not in events
    assert controller.last_run_kind == "apply" and controller.last_result.report == "right lung"


def test_logic_process_that_times_out_stops_its_worker_and_writes_nothing(release, scene, tiny_model):
    """Scripted use: ``process(..., timeout)`` past its time raises TimeoutError, the worker stops after its batch
    instead of segmenting on unseen, and the scene gets no segmentation."""
    import threading
    import time

    import numpy as np
    import slicer

    _, module = release
    volume = slicer.util.addVolumeFromArray(np.full((40, 32, 40), 100, dtype=np.int16), name="synthetic")
    logic = module.LanguageGuidedSegLogic()
    controllers = []
    create = logic.createController
    logic.createController = lambda *args, **kwargs: controllers.append(create(*args, **kwargs)) or controllers[-1]
    with pytest.raises(TimeoutError):
        logic.process(volume, model=str(tiny_model), device="cpu", timeout=0.0)
    assert not controllers[0].running  # cancelled and let go
    deadline = time.monotonic() + 60
    while any(t.name == "LanguageGuidedSeg" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "LanguageGuidedSeg" for t in threading.enumerate())
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_inside_the_application_the_logic_runs_the_model_in_its_worker_process(release, scene, tiny_model, tmp_path,
                                                                              monkeypatch):
    """Inside the Slicer application (``slicer.app`` exists) the logic's controller runs the model in the worker
    process it starts from ``PythonSlicer`` on the PATH (here a launcher of this test's Python); ``close`` stops
    it."""
    import os
    import shlex

    import numpy as np
    import slicer

    from languageguidedseg.worker import ProcessWorker

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path), os.environ.get("PATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, like the test process (conftest)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    _, module = release
    volume = slicer.util.addVolumeFromArray(np.full((3, 32, 40), 100, dtype=np.int16), name="synthetic")
    logic = module.LanguageGuidedSegLogic()
    try:
        node = logic.getParameterNode()
        node.inputVolume, node.model, node.device, node.scope = volume, str(tiny_model), "cpu", "volume"
        controller = logic.createController(node)
        worker = logic.workerProcess()
        assert isinstance(worker, ProcessWorker) and not worker.alive  # started by the first run
        controller.run()
        assert worker.alive
        controller.wait(180)
        assert controller.last_result is not None and controller.last_result.slice_index is None
        assert node.outputSegmentation is controller.last_result.segmentation_node
        assert node.reportSource == "prototype" and node.report == controller.last_result.report
    finally:
        logic.close()
    assert not worker.alive and logic.worker is None


def test_reload_imports_the_library_and_the_engine_afresh_and_stops_the_worker(release, scene, hung_worker,
                                                                              monkeypatch):
    """Slicer's Reload (the release's ``ScriptedLoadableModuleWidget.onReload``, ``slicer.util.reloadScriptedModule``)
    executes the module file again; the module's ``onReload`` has its library and the engine imported afresh too, and
    the old widget's cleanup closes the worker process without waiting for it. What only the application has stands
    in: ``slicer.modules``, the module's widget representation and the module manager."""
    import time
    import types

    import slicer

    from languageguidedseg.worker import ProcessWorker

    _, module = release
    families = ("LanguageGuidedSeg", "LanguageGuidedSegLib", "languageguidedseg")
    before = {name: m for name, m in sys.modules.items() if name.split(".")[0] in families}
    widget = object.__new__(module.LanguageGuidedSegWidget)  # its __init__ builds Qt widgets
    module.VTKObservationMixin.__init__(widget)
    widget.moduleName, widget.controller, widget._parameterNode = "LanguageGuidedSeg", None, None
    widget.logic = module.LanguageGuidedSegLogic()
    widget.logic.worker = worker = ProcessWorker(str(hung_worker), stop_grace_s=0.5)
    worker.start()
    pid_file = Path(f"{hung_worker}.pid")
    representation = types.SimpleNamespace(children=lambda: [], layout=lambda: types.SimpleNamespace(count=lambda: 0))
    recreated = []
    widget.parent = types.SimpleNamespace(reload=lambda: recreated.append(True))
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        languageguidedseg=types.SimpleNamespace(path=str(MODULE_FILE), widgetRepresentation=lambda: representation),
        LanguageGuidedSegWidget=widget), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        moduleManager=lambda: types.SimpleNamespace(disconnect=lambda *args: None)), raising=False)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        widget.onReload()
        assert recreated == [True] and widget.logic.worker is None and not worker.alive
        for name in ("LanguageGuidedSeg", "LanguageGuidedSegLib", "LanguageGuidedSegLib.SegmentationLogic",
                     "languageguidedseg", "languageguidedseg.parameters"):
            assert sys.modules[name] is not before[name], f"{name} was not imported afresh"
        # Engine modules that loading the module does not import are imported afresh on first use.
        assert not {"languageguidedseg.controller", "languageguidedseg.worker"} & set(sys.modules)
        pid = int(pid_file.read_text())
        while _process_exists(pid):  # the hung worker is killed after its grace period
            assert time.monotonic() < deadline, "the old worker process is still running"
            time.sleep(0.05)
    finally:
        worker.close()
        for name in [name for name in sys.modules if name.split(".")[0] in families]:
            del sys.modules[name]
        sys.modules.update(before)


def _process_exists(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _used_names(module_prefix: str) -> set:
    """Names the module and its library use from ``slicer.<module_prefix>``: imported, or as attributes."""
    names = set()
    for path in MODULE_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == f"slicer.{module_prefix}":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    isinstance(node.value.value, ast.Name) and node.value.value.id == "slicer" and \
                    node.value.attr == module_prefix:
                names.add(node.attr)
    return names


def _defined_names(path: Path) -> set:
    """Top-level functions, classes and assignments of a source file (and of a package's modules)."""
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    names = set()
    for file in files:
        for node in ast.parse(file.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_every_slicer_api_the_module_uses_exists_in_the_three_releases():
    """``slicer.util``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.i18n`` names
    used by the module and its library, checked against each release's own source; ``slicer.packaging`` (5.12+)
    only where the code guards for its absence, with the keyword arguments it passes."""
    used = {name: _used_names(name) for name in ("util", "ScriptedLoadableModule", "parameterNodeWrapper", "i18n")}
    assert {"loadUI", "childWidgetVariables", "tryWithErrorDisplay", "errorDisplay", "pip_install", "restart",
            "VTKObservationMixin", "confirmOkCancelDisplay", "addVolumeFromArray"} <= used["util"]
    assert {"parameterNodeWrapper", "Choice", "WithinRange"} <= used["parameterNodeWrapper"]
    for release in RELEASES:
        folder = SLICER_PYTHON / release / "slicer"
        if not folder.is_dir():
            pytest.skip(f"Slicer {release}'s Python layer not found in {SLICER_PYTHON}")
        for module_name, names in used.items():
            source = folder / module_name if (folder / module_name).is_dir() else folder / f"{module_name}.py"
            missing = names - _defined_names(source)
            assert not missing, f"Slicer {release} has no slicer.{module_name}.{sorted(missing)}"

    # slicer.packaging's pip_ensure (5.12+) drops a version pin of a skipped package silently: the module installs
    # with its own plan (test_install_plan_...) on every release instead.
    assert "slicer.packaging" not in (LIB_DIR / "InstallLogic.py").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def slicer_like_python(tmp_path_factory):
    """A fresh Python environment holding only this environment's numpy, standing in for Slicer's Python before
    the first install: pip resolves the module's plans in it against the real package index."""
    import numpy

    folder = tmp_path_factory.mktemp("slicer-like-python") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"numpy=={numpy.__version__}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(python)


def _installer(lib, requirements=None, **kwargs):
    logic = _lib("SegmentationLogic")
    kwargs.setdefault("pipInstall", lambda args: pytest.fail(f"pip install {args} without need"))
    kwargs.setdefault("confirm", lambda text: pytest.fail("asked without need"))
    return lib.LanguageGuidedSegInstallLogic(
        str(requirements or logic.LanguageGuidedSegLogic.requirementsPath()), logic.RUNTIME_MODULES,
        logic.LanguageGuidedSegLogic.engineFolder(), **kwargs)


def test_requirements_are_what_a_run_imports_and_torch_comes_from_them(release):
    """Resources/requirements.txt (the engine's core dependencies, test_packaging.py) names exactly the packages of
    the modules the readiness check imports; PyTorchUtils is asked for its torch range, not a second copy."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lib = _lib("InstallLogic")
    installer = _installer(lib)
    required = {canonicalize_name(Requirement(line).name) for line in installer.requirements()}
    distributions = metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in installer.runtimeModules if not m.startswith("languageguidedseg")
                for d in distributions[m.split(".")[0]]}
    assert imported == required
    torch = next(Requirement(line) for line in installer.requirements() if Requirement(line).name == "torch")
    assert installer.torchRequirement() == str(torch.specifier) != ""
    assert not re.search(r"['\"]>=\d", (LIB_DIR / "SegmentationLogic.py").read_text(encoding="utf-8"))


def test_readiness_is_what_a_fresh_interpreter_can_import(release, slicer_like_python):
    """Ready here (everything installed); in an environment holding only numpy, every missing package is named (a
    half-finished install is not ready), numpy is not."""
    lib = _lib("InstallLogic")
    assert _installer(lib).missingRuntimeModules() == []
    assert _installer(lib).isReady()
    problems = _installer(lib, python=slicer_like_python).missingRuntimeModules()
    named = {problem.split(":")[0] for problem in problems}
    assert {"torch>=2.1", "safetensors>=0.4", "tokenizers>=0.15", "slicerio>=1.0", "tqdm>=4.60"} <= named
    assert not any(problem.startswith(("numpy", "SimpleITK>")) for problem in named if "not installed" in problem)
    assert "numpy>=1.24" not in named


def test_install_plan_from_real_metadata_never_holds_what_slicer_ships(release, slicer_like_python):
    """The plan for an environment that has only Slicer's numpy, resolved by pip against the real package index
    (``--dry-run --report``): the runtime packages and everything they need (huggingface-hub for tokenizers, pynrrd
    for slicerio, ...), and none of the protected packages, although slicerio and pynrrd depend on numpy."""
    from packaging.utils import canonicalize_name

    lib = _lib("InstallLogic")
    plan = _installer(lib, python=slicer_like_python).installPlan()
    names = {canonicalize_name(line.split("==")[0]) for line in plan}
    assert all("==" in line for line in plan)
    assert {"safetensors", "tokenizers", "slicerio", "tqdm", "huggingface-hub", "pynrrd"} <= names
    assert not names & {canonicalize_name(p) for p in lib.PROTECTED_PACKAGES}
    assert not names & {"monai", "transformers", "sentence-transformers", "scikit-learn", "scipy"}


@pytest.mark.parametrize("release", ["5.12.3"], indirect=True)
def test_install_errors_say_what_to_do(release, slicer_like_python, monkeypatch):
    """A plan that would install a protected package, one pip cannot resolve (a newer numpy than Slicer's), and an
    offline pip are install errors that say what to do; offline, with the commands that install wheels one by one
    without dependencies. (On 5.12.3's layer: the messages need 5.12's i18n, which works without the
    application.)"""
    lib = _lib("InstallLogic")
    installer = _installer(lib, python=slicer_like_python)
    with pytest.raises(lib.DependencyError, match="(?i)simpleitk==.*never installs or replaces"):
        installer.installPlan(["SimpleITK>=2.3"])  # not in that environment: the plan would install it
    with pytest.raises(lib.DependencyError, match="pip could not install"):
        installer.installPlan(["numpy>=999"])
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null" if sys.platform != "win32" else "nul")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(lib.DependencyError, match="cannot be reached") as offline:
        installer.installPlan()
    message = str(offline.value)
    assert "pip download --only-binary=:all:" in message and "'--no-index', '--no-deps'" in message
    assert "'torch-', 'numpy-'" in message


@pytest.mark.parametrize("release", ["5.12.3"], indirect=True)
def test_installer_asks_installs_the_plan_and_checks_the_result(release, slicer_like_python, tmp_path, monkeypatch):
    """Not ready: ask with the plan; declining installs nothing. Agreeing installs the plan's exact versions in one
    pip run without dependency resolution, then checks again in a fresh interpreter: still not runnable (as in
    Slicer's testing mode, where nothing is installed) is an error, not "ready". A module that this process had
    imported from a replaced distribution (not only a top-level requirement: tqdm's, typing_extensions' ...) asks
    for a restart; a failed pip run is an install error. Without torch, the PyTorch extension is asked for the
    requirements file's torch range; an installed torch out of range is an error saying what to do."""
    lib = _lib("InstallLogic")
    asked, pip_calls, restarts = [], [], []
    installer = _installer(lib, python=slicer_like_python, pipInstall=pip_calls.append,
                           confirm=lambda text: asked.append(text) or False, offerRestart=lambda: restarts.append(1))
    assert not installer.isReady()
    assert installer.ensure() is False and pip_calls == [] and not installer.ready
    assert "safetensors==" in asked[0] and "huggingface" in asked[0].lower() and "numpy==" not in asked[0]

    installer.confirm = lambda text: True
    with pytest.raises(lib.DependencyError, match="still cannot run after the install"):
        installer.ensure()
    assert len(pip_calls) == 1 and pip_calls[0][:2] == ["--no-deps", "--force-reinstall"]
    assert all("==" in arg for arg in pip_calls[0] if not arg.startswith("--"))
    assert installer.restartNeeded and restarts == [1] and not installer.ready
    assert lib.topLevelModules("typing_extensions") == {"typing_extensions"} and "typing_extensions" in sys.modules

    def failingPip(args):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *args])

    failing = _installer(lib, python=slicer_like_python, pipInstall=failingPip, confirm=lambda text: True)
    with pytest.raises(lib.DependencyError, match="pip could not install"):
        failing.ensure()

    # No torch: the PyTorch extension is asked for the requirements file's range (here declined: nothing else runs).
    asked = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            asked.append((askConfirmation, torchVersionRequirement))

    class NoTorchMetadata:
        PackageNotFoundError = lib.metadata.PackageNotFoundError

        def __getattr__(self, name):
            return getattr(lib.metadata, name)

        def version(self, name):
            if name == "torch":
                raise self.PackageNotFoundError(name)
            return lib.metadata.version(name)

    noTorch = _installer(lib, python=slicer_like_python,
                         pyTorchUtils=types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(lib, "metadata", NoTorchMetadata())
    assert noTorch.ensure() is False and asked == [(True, noTorch.torchRequirement())]
    monkeypatch.undo()

    requirements = Path(installer.requirementsPath).read_text(encoding="utf-8")
    path = tmp_path / "requirements.txt"
    path.write_text(re.sub(r"^torch\S*", "torch>=99", requirements, flags=re.M), encoding="utf-8")
    with pytest.raises(lib.DependencyError, match="PyTorch Utils"):
        _installer(lib, requirements=path, python=slicer_like_python, confirm=lambda text: True).ensure()
