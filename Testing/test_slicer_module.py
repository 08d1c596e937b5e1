"""Checks of the Slicer module that need no Slicer application.

Static checks: the .ui parses and holds every widget the module uses, the module imports nothing heavy at file
scope, every module file is listed in CMake, and the catalog entry matches the CMake project. Then the CMake
packaging is configured, built and installed against a stand-in for Slicer's CMake macros, and the module file is
loaded with small stand-ins for Qt, CTK and Slicer's Python-only helpers, so its logic (and its own self-test) run on
the real MRML library of ``slicer-core``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LanguageGuidedSeg"
MODULE_FILE = MODULE_DIR / "LanguageGuidedSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LanguageGuidedSeg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG = ROOT / "LanguageGuidedSeg.json"

# Folders under LanguageGuidedSeg/ that are not shipped with the module: build-time tests (their own CMake files)
# and documentation pictures.
NOT_PACKAGED = ("Testing/", "Resources/Screenshots/")
LIGHT_MODULES = {"slicer", "qt", "ctk", "vtk", "__future__"}
HEAVY_MODULES = ("torch", "monai", "transformers", "safetensors", "sklearn", "languageguidedseg", "SimpleITK")
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


def _parameter_annotations() -> dict:
    """Parameter name -> annotation source, from the @parameterNodeWrapper class of the module."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {
                item.target.id: ast.get_source_segment(source, item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in the module")


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
    """Bound names are parameters of the wrapper, and each widget type has a parameterNodeWrapper connector."""
    parameters = _parameter_annotations()
    bound = _ui_bound_parameters()
    assert set(bound) <= set(parameters), f"unknown parameters in the .ui: {set(bound) - set(parameters)}"
    assert {"inputVolume", "outputSegmentation", "scope", "sliceView", "report", "threshold", "device"} <= set(bound)
    # A str binds to QTextEdit or QLineEdit (there is no QPlainTextEdit connector).
    assert bound["report"] == "QTextEdit"
    for name, widget_class in bound.items():
        annotation = parameters[name]
        if "vtkMRML" in annotation:
            assert widget_class == "qMRMLNodeComboBox", name
        elif "Choice" in annotation:
            assert widget_class == "QComboBox", name
        elif "float" in annotation:
            assert widget_class in ("ctkSliderWidget", "QDoubleSpinBox"), name
            assert "WithinRange" in annotation, f"a slider needs a bounded float: {name}"


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
    for node in _statements_run_at_import(_module_tree()):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [(node.module or "").split(".")[0]] if node.level == 0 else ["<relative>"]
        else:
            continue
        offending += [f"line {node.lineno}: {r}" for r in roots if r not in LIGHT_MODULES | stdlib]
    assert not offending, f"heavy or third-party imports at file scope: {offending}"


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
        for name in ("LanguageGuidedSeg.py", "Resources/UI/LanguageGuidedSeg.ui",
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
# Loading the module file without Slicer's GUI
# ----------------------------------------------------------------------------------------------------------------


def _stub_modules(scene=None) -> dict:
    """Stand-ins for the Qt/CTK/GUI-side modules the module file imports; slicer-core provides the rest."""
    import slicer
    from slicer.util import VTKObservationMixin  # noqa: F401  (provided by slicer-core)

    qt = types.ModuleType("qt")
    ctk = types.ModuleType("ctk")

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = choices

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    def parameterNodeWrapper(cls):
        defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

        def __init__(self, node):
            self.parameterNode = node
            for name, value in defaults.items():
                setattr(self, name, value)

        cls.__init__ = __init__
        return cls

    wrapper.Choice, wrapper.WithinRange, wrapper.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return slicer.vtkMRMLScriptedModuleNode()

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return {"qt": qt, "ctk": ctk, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted}


def _load_module_file(monkeypatch):
    pytest.importorskip("slicer")
    for name, module in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    # The module may put the engine's folder on sys.path; undo that after the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("LanguageGuidedSegUnderTest", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_with_heavy_modules_blocked(body: str, blocked=HEAVY_MODULES, env=None) -> str:
    """Run ``body`` in a fresh interpreter where ``blocked`` cannot be imported, after loading the module file (as
    ``module``) with the Qt/CTK stand-ins; return its stdout."""
    script = f"""
import importlib.util, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
for blocked in {list(blocked)!r}:
    sys.modules[blocked] = None  # any import of these fails
import test_slicer_module as checks
sys.modules.update(checks._stub_modules())
spec = importlib.util.spec_from_file_location("LanguageGuidedSeg", {str(MODULE_FILE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
""" + body
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_module_file_loads_without_torch_or_the_engine():
    """Importing the module file (with torch and the engine made unimportable) pulls in no heavy package."""
    pytest.importorskip("slicer")
    out = _run_with_heavy_modules_blocked(f"""
logic = module.LanguageGuidedSegLogic()
assert logic.getParameterNode().report == ""
print("loaded", sorted(m for m in {list(HEAVY_MODULES)!r} if sys.modules.get(m) is not None))
""")
    assert "loaded []" in out


def test_model_list_is_there_before_torch_is_installed(tmp_path):
    """With torch (and the other heavy packages) unimportable, the module lists the models through the engine,
    exactly as ``package.list_models()`` does; the engine's listing imports nothing heavy."""
    pytest.importorskip("slicer")
    models = tmp_path / "models"
    configs = {
        "tuned": {"task": "lungs", "licence": "MIT", "version": "1.2.0", "threshold": 0.3},
        "untuned": {"task": "polyps", "licence": "CC-BY-4.0"},
        "odd": {"task": "odd", "threshold": "high"},
    }
    for name, config in configs.items():
        (models / name).mkdir(parents=True)
        (models / name / "model.json").write_text(json.dumps({"config": config}))
    (models / ".staging").mkdir()  # import_model's staging folder: never listed
    (models / ".staging" / "model.json").write_text(json.dumps({"config": {}}))
    engine_blocked = [m for m in HEAVY_MODULES if m != "languageguidedseg"]
    out = _run_with_heavy_modules_blocked(f"""
import json
logic = module.LanguageGuidedSegLogic()
listed = logic.availableModels()
from languageguidedseg import package
assert listed == [m.to_dict() for m in package.list_models()], listed
assert logic.userModelsFolder() == str(package.user_models_folder())
assert logic.defaultModelName() == package.DEFAULT_MODEL
print("listed", json.dumps(listed))
print("loaded", sorted(m for m in {engine_blocked!r} if sys.modules.get(m) is not None))
""", blocked=engine_blocked, env={"LGSEG_MODELS": str(models)})
    assert "loaded []" in out
    listed = json.loads(out.split("listed ", 1)[1].splitlines()[0])
    by_name = {m["name"]: m for m in listed if m["source"] == "user"}
    assert set(by_name) == set(configs)
    assert {n: (m["task"], m["licence"], m["threshold"]) for n, m in by_name.items()} == {
        "tuned": ("lungs", "MIT", 0.3), "untuned": ("polyps", "CC-BY-4.0", 0.5), "odd": ("odd", "", 0.5)}
    # The keys the widget shows or uses.
    assert all({"name", "task", "licence", "version", "size_mb", "path", "source", "threshold"} <= set(m)
               for m in listed)
    assert by_name["tuned"]["path"] == str(models / "tuned")


@pytest.fixture
def module(monkeypatch):
    return _load_module_file(monkeypatch)


@pytest.fixture
def scene(monkeypatch):
    import slicer

    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    yield scene
    scene.Clear(1)


def _synthetic_volume(scene):
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    voxels = np.zeros((4, 40, 56), dtype=np.int16)
    voxels[:, 8:30, 10:40] = 900
    image = vtk.vtkImageData()
    image.SetDimensions(56, 40, 4)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.6, 3.0)
    return node


def test_logic_process_works_without_the_widget(module, scene, tiny_model):
    """``process`` delegates to the engine: volume run, slice run and a cancelled run, with no widget at all."""
    import numpy as np

    from languageguidedseg import mrml
    from languageguidedseg.inference import SegmentationCancelled

    logic = module.LanguageGuidedSegLogic()
    volume = _synthetic_volume(scene)
    result = logic.process(volume, None, model=str(tiny_model), device="cpu", threshold=0.5)
    assert result.report_source == "prototype" and result.report.startswith("prototype report")
    segmentation = result.segmentation_node
    assert segmentation is not None and segmentation.GetScene() is scene
    assert segmentation.GetSegmentation().GetSegment(result.segment_id).GetName() == "Infection"
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, result.segment_id, volume), result.mask)

    before = result.mask.copy()
    second = logic.process(volume, segmentation, report="two infected areas", model=str(tiny_model),
                           scope="slice", sliceIndex=2, axis=2, device="cpu", threshold=0.49)
    assert second.report_source == "given" and second.segment_id == result.segment_id
    after = mrml.segment_mask(segmentation, second.segment_id, volume)
    np.testing.assert_array_equal(after[[0, 1, 3]], before[[0, 1, 3]])

    nodes = scene.GetNumberOfNodes()
    with pytest.raises(SegmentationCancelled):
        logic.process(volume, None, model=str(tiny_model), device="cpu", cancel=lambda: True)
    assert scene.GetNumberOfNodes() == nodes
    # The loaded model is cached between runs (a slice must not pay for loading it again).
    assert logic.segmenter(str(tiny_model), "cpu") is logic.segmenter(str(tiny_model), "cpu")


def test_background_run_reports_progress_and_cancels(module, scene, tiny_model):
    """The worker used by the widget: progress per slice, and a cancel that leaves the scene unchanged."""
    logic = module.LanguageGuidedSegLogic()
    volume = _synthetic_volume(scene)
    job = logic.createJob(volume, model=str(tiny_model), device="cpu")
    run = module.LanguageGuidedSegRun(logic, job)
    run.start()
    run._thread.join(timeout=120)
    assert run.finished and run.error is None and not run.cancelled
    assert (run.done, run.total) == (4, 4)
    nodes = scene.GetNumberOfNodes()
    result = logic.writeJob(job)
    assert scene.GetNumberOfNodes() > nodes and result.segment_id

    cancelled = module.LanguageGuidedSegRun(logic, logic.createJob(volume, model=str(tiny_model), device="cpu"))
    cancelled.cancel()
    cancelled.start()
    cancelled._thread.join(timeout=120)
    assert cancelled.finished and cancelled.cancelled and cancelled.error is None


def test_gpu_out_of_memory_falls_back_to_the_cpu(module, scene, tiny_model, monkeypatch):
    """CUDA running out of memory is not a crash: the same job runs again on the CPU, and the user is told."""
    import torch

    from languageguidedseg.inference import Segmenter

    cpu = Segmenter(model=tiny_model, device="cpu")

    class OutOfMemoryGpu:
        device = "cuda:0"
        package = cpu.package

        def segment_array(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    requested = []

    def fake_segmenter(model=None, device="auto"):
        requested.append(device)
        return cpu if device == "cpu" else OutOfMemoryGpu()

    logic = module.LanguageGuidedSegLogic()
    monkeypatch.setattr(logic, "segmenter", fake_segmenter)
    result = logic.process(_synthetic_volume(scene), None, model=str(tiny_model), device="auto")
    assert requested == ["auto", "cpu"] and logic.fellBackToCpu
    assert result.mask.shape == (4, 40, 56) and result.segment_id

    # Any other error, even one that mentions memory, is reported as it is, not retried.
    class Broken(OutOfMemoryGpu):
        def segment_array(self, *args, **kwargs):
            raise RuntimeError("something else: out of memory in a custom operator")

    monkeypatch.setattr(logic, "segmenter", lambda model=None, device="auto": Broken())
    with pytest.raises(RuntimeError, match="something else"):
        logic.process(_synthetic_volume(scene), None, model=str(tiny_model), device="auto")


def test_module_self_test_runs_on_the_mrml_library(module, scene, monkeypatch):
    """The module's own ScriptedLoadableModuleTest, on slicer-core instead of the Slicer application."""
    import slicer

    # slicer.util's segment helpers reach the Segmentations module logic through slicer.modules.
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations = types.SimpleNamespace(logic=lambda: segmentations_logic)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(segmentations=segmentations), raising=False)
    test = module.LanguageGuidedSegTest()
    test.setUp()
    test.test_ModuleLoadsWithoutEngine()
    test.setUp()
    test.test_LogicOnSyntheticVolume()


def test_model_list_matches_the_engine(module, tiny_model, tmp_path, monkeypatch):
    """The module's model list and models folder are the engine's, for a real model package."""
    from languageguidedseg import package

    user = tmp_path / "user-models"
    shutil.copytree(tiny_model, user / "tiny")
    (user / ".staging").mkdir()
    monkeypatch.setenv("LGSEG_MODELS", str(user))
    logic = module.LanguageGuidedSegLogic()

    assert Path(logic.userModelsFolder()) == package.user_models_folder() == user
    assert logic.defaultModelName() == package.DEFAULT_MODEL
    listed = {m["name"]: m for m in logic.availableModels()}
    engine = {m.name: m for m in package.list_models()}
    assert set(listed) == set(engine) and "tiny" in listed
    for name, info in engine.items():
        assert (listed[name]["licence"], listed[name]["task"], listed[name]["source"], listed[name]["threshold"]) == (
            info.licence, info.task, info.source, info.threshold)
    assert (listed["tiny"]["source"], listed["tiny"]["licence"]) == ("user", "Apache-2.0")
    assert listed["tiny"]["threshold"] == pytest.approx(0.5)


def test_dependency_check_reads_the_requirements(module):
    """The fallback check (Slicer before 5.12) parses requirements.txt and finds the installed packages."""
    logic = module.LanguageGuidedSegLogic()
    lines = [line.split("#")[0].strip() for line in Path(logic.requirementsPath()).read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and not any(r.split(">")[0].split("=")[0].strip().lower() in ("torch", "numpy", "simpleitk")
                                     for r in requirements), "torch, numpy and SimpleITK must never be pip-installed"
    assert logic.missingRequirements() == []  # this test environment has the engine's dependencies
