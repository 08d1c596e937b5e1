import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

import slicer
from slicer.i18n import tr as _

# What Slicer ships (numpy, SimpleITK, VTK; Qt through PythonQt, so any pip Qt binding would be a second Qt) and torch
# from the PyTorch extension: never installed, upgraded or downgraded by this module (another extension, or Slicer
# itself, depends on the exact build). Checked against the requirements, never installed.
PROTECTED_PACKAGES = ("torch", "numpy", "SimpleITK", "vtk", "PyQt5", "PyQt6", "PySide2", "PySide6")

# Run in a fresh interpreter of Slicer's Python: every runtime requirement and everything it needs is installed at an
# allowed version (importlib.metadata), and what a run imports imports. Prints the problems as a JSON list.
READINESS_SCRIPT = r"""
import importlib, importlib.util, json, os, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
engineFolder, requirementTexts, modules = json.loads(sys.argv[1])
# The engine package alone, not its folder on sys.path: that folder can be a site-packages holding other packages
# (an installed engine), which would make missing ones look installed.
engine = os.path.join(engineFolder, "languageguidedseg")
spec = importlib.util.spec_from_file_location("languageguidedseg", os.path.join(engine, "__init__.py"),
                                              submodule_search_locations=[engine])
sys.modules["languageguidedseg"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["languageguidedseg"])
problems, seen, pending = [], set(), list(requirementTexts)
while pending:
    requirement = Requirement(pending.pop(0))
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    name = requirement.name.lower().replace("_", "-").replace(".", "-")
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        problems.append(f"{requirement}: not installed")
        continue
    if not requirement.specifier.contains(installed, prereleases=True):
        problems.append(f"{requirement}: {installed} is installed")
    if name not in seen:
        seen.add(name)
        pending += metadata.requires(requirement.name) or []
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken package fails in many ways; any of them stops a run
        problems.append(f"{module}: {exc.__class__.__name__}: {exc}")
if not problems:
    try:
        text = importlib.import_module("languageguidedseg.text")
        text.resolve_encoder_path(text.DEFAULT_TEXT_ENCODER)
    except Exception as exc:
        problems.append(f"languageguidedseg: {exc}")
print(json.dumps(problems))
"""

# Output of a pip that cannot reach the package index.
OFFLINE_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                 "Could not find a version that satisfies", "No matching distribution found", "ProxyError",
                 "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError")


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def _requirementClass():
    # pip and packaging ship with Slicer's Python (pip vendors packaging too).
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _hiddenWindow():
    """subprocess arguments that start a console program without a console window (Windows)."""
    return {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}


def pythonExecutable():
    """Slicer's Python as a program: ``PythonSlicer`` inside the application (its ``sys.executable`` is Slicer
    itself), else this interpreter."""
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def topLevelModules(distributionName):
    """The importable top-level names a distribution installs (``top_level.txt``, else its file list)."""
    try:
        distribution = metadata.distribution(distributionName)
    except metadata.PackageNotFoundError:
        return set()
    listed = distribution.read_text("top_level.txt")
    if listed:
        return {line.strip() for line in listed.splitlines() if line.strip()}
    names = set()
    for path in distribution.files or []:
        parts = path.parts
        if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        if len(parts) > 1:
            names.add(parts[0])
        elif parts[0].endswith((".py", ".so", ".pyd")):
            names.add(parts[0].split(".")[0])
    return names


class DependencyError(RuntimeError):
    """A dependency cannot be installed or is at a version the module cannot use; the message says what to do."""


class LanguageGuidedSegInstallLogic:
    """Installs what the engine needs into Slicer's Python, only after the user agrees, never touching what Slicer
    or the PyTorch extension ship (``PROTECTED_PACKAGES``).

    Readiness is checked by running what a run imports in a fresh interpreter of Slicer's Python
    (:meth:`missingRuntimeModules`), so a broken or half-finished install is seen and repaired on the next Apply.
    torch comes from the PyTorch extension (``PyTorchUtils``), asked for the range in ``Resources/requirements.txt``
    (the engine's ``pyproject.toml`` dependencies). The other packages: pip resolves them against the index once
    (``--dry-run --report``, Slicer's packages pinned to their installed versions), a plan naming a protected package
    is refused, and the plan's exact versions are installed in one pip run with ``--no-deps`` (pip downloads every
    file before it installs any). Collaborators are passed in so that the logic runs and is tested without the
    Slicer application.

    :param requirementsPath: the requirements file.
    :param runtimeModules: the modules a run imports (checked in a fresh interpreter).
    :param engineFolder: the folder that holds the ``languageguidedseg`` package.
    :param pipInstall: ``pip_install(args: list)``; default ``slicer.util.pip_install``.
    :param confirm: ``confirm(text) -> bool``; default ``slicer.util.confirmOkCancelDisplay``.
    :param pyTorchUtils: the PyTorch extension's ``PyTorchUtils`` module, or None when it is not installed.
    :param offerRestart: called when a module that this process had imported was replaced; default: ask the user and
        restart Slicer.
    :param python: Slicer's Python as a program; default :func:`pythonExecutable`.
    """

    def __init__(self, requirementsPath, runtimeModules, engineFolder, pipInstall=None, confirm=None,
                 pyTorchUtils=None, offerRestart=None, python=None):
        self.requirementsPath = requirementsPath
        self.runtimeModules = tuple(runtimeModules)
        self.engineFolder = engineFolder
        self.pipInstall = pipInstall or slicer.util.pip_install
        self.confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(
            text, windowTitle=_("LanguageGuidedSeg - Install Python packages")))
        self.pyTorchUtils = pyTorchUtils
        self.offerRestart = offerRestart or _offerRestart
        self.python = python or pythonExecutable()
        self.ready = False
        self.restartNeeded = False
        self._problems = None  # the last readiness check's answer

    @classmethod
    def forSlicer(cls, requirementsPath, runtimeModules, engineFolder):
        """The installer with Slicer's own functions and the PyTorch extension where it is installed."""
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            PyTorchUtils = None
        return cls(requirementsPath, runtimeModules, engineFolder, pyTorchUtils=PyTorchUtils)

    # Checking ----------------------------------------------------------------------------------------------------

    def requirements(self):
        """Requirement lines of the requirements file."""
        with open(self.requirementsPath, encoding="utf-8") as requirementsFile:
            lines = [line.split("#", 1)[0].strip() for line in requirementsFile]
        return [line for line in lines if line]

    def torchRequirement(self):
        """The torch version range the engine needs (e.g. ">=2.1"), from the requirements file."""
        Requirement = _requirementClass()
        for line in self.requirements():
            requirement = Requirement(line)
            if _canonical(requirement.name) == "torch":
                return str(requirement.specifier)
        return ""

    @staticmethod
    def isSatisfied(requirementText):
        """Whether the installed distribution satisfies the requirement (no pip, no import)."""
        requirement = _requirementClass()(requirementText)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return False
        return requirement.specifier.contains(installed, prereleases=True)

    def missingRuntimeModules(self):
        """What stops a run, checked in a fresh interpreter of Slicer's Python: a requirement (or one of its own
        dependencies) missing or at a version out of range, or a module a run imports that fails to import; as
        "name: reason". Empty when a run can start."""
        argument = json.dumps([self.engineFolder, self.requirements(), list(self.runtimeModules)])
        try:
            done = subprocess.run([self.python, "-c", READINESS_SCRIPT, argument], capture_output=True, text=True,
                                  timeout=300, **_hiddenWindow())
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [f"{self.python}: {exc}"]
        try:
            problems = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return [f"{self.python}: " + (done.stderr.strip().splitlines() or ["no answer"])[-1]]
        self._problems = problems
        return problems

    def missingRequirements(self):
        """Requirement lines of the file that are not installed or out of range (no import; see
        :meth:`missingRuntimeModules` for the whole check)."""
        return [line for line in self.requirements() if not self.isSatisfied(line)]

    def torchProblem(self):
        """None when an installed torch satisfies the engine, else a message saying what to do."""
        try:
            installed = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return _("PyTorch is not installed.")
        if self.isSatisfied("torch" + self.torchRequirement()):
            return None
        return _(
            "PyTorch {installed} is installed, but LanguageGuidedSeg needs torch{required}. Open the PyTorch Utils "
            "module, uninstall PyTorch, restart Slicer, and press Apply again: a matching version is then installed."
        ).format(installed=installed, required=self.torchRequirement())

    def isReady(self):
        """Whether a run can start (no dialog, no install): checked once, in a fresh interpreter, then remembered
        until :meth:`ensure` checks again."""
        if not self.ready and self._problems is None:
            self.ready = not self.missingRuntimeModules()
        return self.ready

    # Planning --------------------------------------------------------------------------------------------------

    def protectedConstraints(self):
        """``name==version`` of every protected package that is installed: pip must keep them as they are."""
        constraints = []
        for name in PROTECTED_PACKAGES:
            try:
                constraints.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
        return constraints

    def installPlan(self, requirementTexts=None):
        """``name==version`` of every distribution that pip would install for the requirements (default: the
        file's, less the protected ones), resolved against the package index from the packages' real metadata
        (``pip install --dry-run --report``), dependencies included, with the protected packages pinned to their
        installed versions. Raises DependencyError when the plan would install a protected package, or pip cannot
        resolve or reach the index (the message says what to do)."""
        Requirement = _requirementClass()
        protected = {_canonical(name) for name in PROTECTED_PACKAGES}
        if requirementTexts is None:
            requirementTexts = [line for line in self.requirements()
                                if _canonical(Requirement(line).name) not in protected]
        if not requirementTexts:
            return []
        with tempfile.TemporaryDirectory() as folder:
            constraintsPath = os.path.join(folder, "constraints.txt")
            with open(constraintsPath, "w", encoding="utf-8") as constraintsFile:
                constraintsFile.write("\n".join(self.protectedConstraints()) + "\n")
            reportPath = os.path.join(folder, "report.json")
            args = [self.python, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                    "--report", reportPath, "-c", constraintsPath, *requirementTexts]
            try:
                done = subprocess.run(args, capture_output=True, text=True, timeout=600, **_hiddenWindow())
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DependencyError(self._failedMessage(str(exc))) from exc
            if done.returncode != 0:
                raise DependencyError(self._failedMessage(done.stdout + done.stderr))
            with open(reportPath, encoding="utf-8") as reportFile:
                report = json.load(reportFile)
        plan = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report.get("install", [])]
        refused = [line for line in plan if _canonical(line.split("==")[0]) in protected]
        if refused:
            raise DependencyError(_(
                "Installing LanguageGuidedSeg's packages would also install {packages}, which Slicer or the PyTorch "
                "extension provide and which this module never installs or replaces; update Slicer (or the PyTorch "
                "extension for torch)."
            ).format(packages=", ".join(refused)))
        return plan

    def offlineCommands(self):
        """The commands that install the packages from wheels copied from another computer, with no dependency
        resolution, so that torch and numpy are never touched (as in docs/slicer.md)."""
        Requirement = _requirementClass()
        protected = {_canonical(name) for name in PROTECTED_PACKAGES}
        packages = " ".join(f'"{line}"' for line in self.requirements()
                            if _canonical(Requirement(line).name) not in protected)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return _(
            "On a computer with network access and the same operating system, with Python {version}:\n"
            "  pip download --only-binary=:all: --python-version {version} -d wheels {packages}\n"
            "Copy the wheels folder here, then in Slicer's Python console (one wheel at a time, no dependencies; the "
            "torch, numpy and SimpleITK wheels are left out):\n"
            "  import glob, os; wheels = [w for w in glob.glob('/path/to/wheels/*.whl') if not os.path.basename(w)"
            ".lower().startswith(('torch-', 'numpy-', 'simpleitk-', 'vtk-'))]\n"
            "  slicer.util.pip_install(['--no-index', '--no-deps'] + wheels)\n"
            "then press Apply again."
        ).format(version=version, packages=packages)

    def _failedMessage(self, pipOutput):
        lines = [line for line in pipOutput.strip().splitlines() if line.strip()]
        tail = "\n".join(lines[-6:])
        if any(sign in pipOutput for sign in OFFLINE_SIGNS):
            return _("The Python packages could not be downloaded: the package index (PyPI) cannot be reached "
                     "(offline, or behind a proxy: set HTTPS_PROXY before starting Slicer).\n\n{commands}\n\n"
                     "pip said:\n{tail}").format(commands=self.offlineCommands(), tail=tail)
        return _("pip could not install LanguageGuidedSeg's packages:\n{tail}\n\nThe full output is in the "
                 "application log (View > Error Log).").format(tail=tail)

    # Installing ------------------------------------------------------------------------------------------------

    def ensure(self):
        """Make torch and the engine's packages available. Returns False when the user declines; raises
        DependencyError with what to do when something cannot be installed. Never installs without asking."""
        if self.ready:
            return True
        problems = self.missingRuntimeModules()
        if not problems:
            self.ready = True
            return True
        if not self._ensureTorch():
            return False
        plan = self.installPlan()
        broken = self._brokenDistributions(problems, plan)
        if not plan and not broken:
            raise DependencyError(_(
                "LanguageGuidedSeg cannot run, and there is nothing to install: {problems}").format(
                    problems="; ".join(problems)))
        if not self.confirm(_(
            "LanguageGuidedSeg needs these Python packages, which will be downloaded and installed into Slicer's "
            "Python: {packages}. PyTorch, numpy, SimpleITK and VTK are not changed. Continue?"
        ).format(packages=", ".join(plan + [f"{line} (reinstalled)" for line in broken]))):
            return False
        self._install(plan + broken)
        still = self.missingRuntimeModules()
        if still:
            # e.g. Slicer's testing mode, where nothing is installed.
            raise DependencyError(_(
                "LanguageGuidedSeg still cannot run after the install: {problems}. Press Apply again to repair it, "
                "or install the packages from the Python console with slicer.util.pip_install.").format(
                    problems="; ".join(still)))
        self.ready = True
        return True

    def _brokenDistributions(self, problems, plan):
        """``name==version`` of installed, in-range runtime requirements whose import failed and that the plan does
        not install anyway: reinstalled as they are."""
        Requirement = _requirementClass()
        planned = {_canonical(line.split("==")[0]) for line in plan}
        protected = {_canonical(name) for name in PROTECTED_PACKAGES}
        failed = {problem.split(":")[0].split(".")[0] for problem in problems}
        broken = []
        for line in self.requirements():
            name = Requirement(line).name
            if _canonical(name) in planned | protected or not self.isSatisfied(line):
                continue
            if topLevelModules(name) & failed:
                broken.append(f"{name}=={metadata.version(name)}")
        return broken

    def _ensureTorch(self):
        problem = self.torchProblem()
        if problem is None:
            return True
        if self.isSatisfied("torch"):
            raise DependencyError(problem)  # installed at a version the engine cannot use
        if self.pyTorchUtils is None:
            raise DependencyError(_(
                "This module needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, restart "
                "Slicer, and press Apply again."))
        try:
            torch = self.pyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=self.torchRequirement())
        except Exception as exc:  # light-the-torch or pip: any failure is an install error with what to do
            raise DependencyError(_(
                "PyTorch could not be installed ({error}). Check the network connection (or set HTTPS_PROXY), then "
                "open the PyTorch Utils module and install PyTorch there, restart Slicer and press Apply again."
            ).format(error=f"{exc.__class__.__name__}: {exc}")) from exc
        if torch is None:
            return False
        problem = self.torchProblem()
        if problem is not None:
            raise DependencyError(problem)
        return True

    def _install(self, plan):
        if not plan:
            return
        imported = {name.split(".")[0] for name, module in list(sys.modules.items()) if module is not None}
        logging.info("LanguageGuidedSeg: pip install --no-deps --force-reinstall " + " ".join(plan))
        try:
            # The plan's exact versions, with nothing resolved again: what was checked is what is installed.
            self.pipInstall(["--no-deps", "--force-reinstall", "--disable-pip-version-check", *plan])
        except Exception as exc:  # CalledProcessError from slicer.util, or the launcher itself
            raise DependencyError(self._failedMessage(f"{exc.__class__.__name__}: {exc}")) from exc
        replaced = set()
        for line in plan:
            replaced |= topLevelModules(line.split("==")[0]) & imported
        self.restartNeeded = bool(replaced)
        if self.restartNeeded:
            logging.info("LanguageGuidedSeg: replaced modules that were already imported: "
                         + ", ".join(sorted(replaced)))
            self.offerRestart()


def _offerRestart():
    if slicer.util.confirmYesNoDisplay(_("Python packages that Slicer had already loaded were replaced; restart "
                                         "Slicer now so that the new versions are used?")):
        slicer.util.restart()
