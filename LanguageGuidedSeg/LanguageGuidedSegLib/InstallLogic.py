import importlib.util
import logging
import sys
from importlib import metadata

import slicer
from slicer.i18n import tr as _

# torch comes from the PyTorch extension; numpy, SimpleITK and vtk come with Slicer. An install must never replace
# any of them (another extension, or Slicer itself, depends on the exact build).
PROTECTED_PACKAGES = ("torch", "numpy", "SimpleITK", "vtk")


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def _requirementClass():
    # pip and packaging ship with Slicer's Python (pip vendors packaging too).
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


class DependencyError(RuntimeError):
    """A dependency cannot be installed or is at a version the module cannot use; the message says what to do."""


class LanguageGuidedSegInstallLogic:
    """Installs what the engine needs into Slicer's Python, only after the user agrees, never touching torch, numpy,
    SimpleITK or vtk.

    torch through the PyTorch extension (``PyTorchUtils``), checked against the engine's requirement; the other
    packages from ``Resources/requirements.txt``: on Slicer 5.12+ with ``slicer.packaging.pip_ensure``
    (``skip_packages``), before that one package at a time with ``--no-deps`` and then its own dependencies, the way
    SlicerTotalSegmentator and SlicerNNUnet install theirs. Collaborators are passed in so that the logic runs and is
    tested without the Slicer application.

    :param requirementsPath: the requirements file.
    :param torchRequirement: e.g. ">=2.1".
    :param pipInstall: ``pip_install(args: list)``; default ``slicer.util.pip_install``.
    :param confirm: ``confirm(text) -> bool``; default ``slicer.util.confirmOkCancelDisplay``.
    :param packaging: the ``slicer.packaging`` module, or None before Slicer 5.12.
    :param pyTorchUtils: the PyTorch extension's ``PyTorchUtils`` module, or None when it is not installed.
    :param offerRestart: called when a package that was already imported was updated; default: ask the user and
        restart Slicer.
    """

    def __init__(self, requirementsPath, torchRequirement, pipInstall=None, confirm=None, packaging=None,
                 pyTorchUtils=None, offerRestart=None):
        self.requirementsPath = requirementsPath
        self.torchRequirement = torchRequirement
        self.pipInstall = pipInstall or slicer.util.pip_install
        self.confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(
            text, windowTitle=_("LanguageGuidedSeg - Install Python packages")))
        self.packaging = packaging
        self.pyTorchUtils = pyTorchUtils
        self.offerRestart = offerRestart or _offerRestart
        self.ready = False
        self.restartNeeded = False

    @classmethod
    def forSlicer(cls, requirementsPath, torchRequirement):
        """The installer with Slicer's own functions (``slicer.packaging`` where the release has it)."""
        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            PyTorchUtils = None
        return cls(requirementsPath, torchRequirement, packaging=packaging, pyTorchUtils=PyTorchUtils)

    # Checking ----------------------------------------------------------------------------------------------------

    def requirements(self):
        """Requirement lines of the requirements file."""
        with open(self.requirementsPath, encoding="utf-8") as requirementsFile:
            lines = [line.split("#", 1)[0].strip() for line in requirementsFile]
        return [line for line in lines if line]

    @staticmethod
    def isSatisfied(requirementText):
        """Whether the installed distribution satisfies the requirement (no pip, no import)."""
        requirement = _requirementClass()(requirementText)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return False
        return requirement.specifier.contains(installed, prereleases=True)

    def missingRequirements(self):
        """Requirement lines that are not installed or too old."""
        return [line for line in self.requirements() if not self.isSatisfied(line)]

    def torchProblem(self):
        """None when an installed torch satisfies the engine, else a message saying what to do."""
        try:
            installed = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return _("PyTorch is not installed.")
        if self.isSatisfied("torch" + self.torchRequirement):
            return None
        return _(
            "PyTorch {installed} is installed, but LanguageGuidedSeg needs torch{required}. Open the PyTorch Utils "
            "module, uninstall PyTorch, restart Slicer, and press Apply again: a matching version is then installed."
        ).format(installed=installed, required=self.torchRequirement)

    # Planning --------------------------------------------------------------------------------------------------

    def installPlan(self, requirementTexts):
        """pip argument lists that install ``requirementTexts`` and their dependencies one package at a time with
        ``--no-deps``, skipping what is already satisfied. A protected package that is missing or at a version that a
        requirement rules out raises DependencyError: installing it would replace Slicer's own build."""
        Requirement = _requirementClass()
        plan, seen = [], set()
        pending = list(requirementTexts)
        while pending:
            text = pending.pop(0)
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(requirement.name)
            if name in {_canonical(p) for p in PROTECTED_PACKAGES}:
                if not self.isSatisfied(str(requirement).split(";")[0]):
                    raise DependencyError(_(
                        "A LanguageGuidedSeg dependency needs {requirement}, which Slicer provides and which is not "
                        "replaced; update Slicer (or the PyTorch extension for torch).").format(requirement=text))
                continue
            key = (name, str(requirement.specifier))
            if key in seen:
                continue
            seen.add(key)
            if self.isSatisfied(str(requirement).split(";")[0]):
                continue
            plan.append([f"{requirement.name}{requirement.specifier}", "--no-deps"])
            pending += self._declaredDependencies(requirement.name)
        return plan

    @staticmethod
    def _declaredDependencies(name):
        """Dependencies declared by the installed distribution (after its --no-deps install), else none known."""
        try:
            return list(metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            return []

    def isReady(self):
        """Whether everything is installed already (no dialog, no install): checked once, then remembered."""
        if not self.ready and self.torchProblem() is None and not self.missingRequirements():
            self.ready = True
        return self.ready

    # Installing ------------------------------------------------------------------------------------------------

    def ensure(self):
        """Make torch and the engine's packages available. Returns False when the user declines; raises
        DependencyError with what to do when something cannot be installed. Never installs without asking."""
        if self.ready:
            return True
        if not self._ensureTorch():
            return False
        missing = self.missingRequirements()
        if missing:
            if not self.confirm(_(
                "LanguageGuidedSeg needs these Python packages, which will be downloaded and installed into "
                "Slicer's Python: {packages}. PyTorch, numpy, SimpleITK and VTK are not changed. Continue?"
            ).format(packages=", ".join(missing))):
                return False
            self._install(missing)
            still = self.missingRequirements()
            if still:
                # e.g. Slicer's testing mode, where pip_ensure installs nothing.
                raise DependencyError(_(
                    "These packages are still missing after the install: {packages}. Install them from the Python "
                    "console with slicer.util.pip_install, then press Apply again.").format(packages=", ".join(still)))
        self.ready = True
        return True

    def _ensureTorch(self):
        problem = self.torchProblem()
        if problem is None:
            return True
        if importlib.util.find_spec("torch") is not None or "torch" in sys.modules:
            raise DependencyError(problem)  # installed at a version the engine cannot use
        if self.pyTorchUtils is None:
            raise DependencyError(_(
                "This module needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, restart "
                "Slicer, and press Apply again."))
        torch = self.pyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=self.torchRequirement)
        if torch is None:
            return False
        problem = self.torchProblem()
        if problem is not None:
            raise DependencyError(problem)
        return True

    def _install(self, missing):
        imported = {_canonical(name.split(".")[0]) for name in sys.modules}
        if self.packaging is not None and hasattr(self.packaging, "pip_ensure"):
            # Slicer 5.12+: we asked already; pip_ensure skips the protected packages and offers a restart itself.
            self.packaging.pip_ensure(missing, skip_packages=list(PROTECTED_PACKAGES), prompt_install=False,
                                      requester="LanguageGuidedSeg")
            return
        plan = self.installPlan(missing)
        while plan:
            args = plan.pop(0)
            logging.info("LanguageGuidedSeg: pip install " + " ".join(args))
            self.pipInstall(args)
            # The package's own dependencies are known only once it is installed: plan them now.
            name = _requirementClass()(args[0]).name
            done = {_canonical(_requirementClass()(a[0]).name) for a in plan}
            plan += [a for a in self.installPlan(self._declaredDependencies(name))
                     if _canonical(_requirementClass()(a[0]).name) not in done]
        installedNow = {_canonical(_requirementClass()(line).name) for line in missing}
        self.restartNeeded = bool(installedNow & imported)
        if self.restartNeeded:
            self.offerRestart()


def _offerRestart():
    if slicer.util.confirmYesNoDisplay(_("Packages that were already loaded were updated; restart Slicer now so that "
                                         "the new versions are used?")):
        slicer.util.restart()

