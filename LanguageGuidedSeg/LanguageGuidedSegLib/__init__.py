from .InstallLogic import PROTECTED_PACKAGES, DependencyError, LanguageGuidedSegInstallLogic
from .ParameterNode import LanguageGuidedSegParameterNode
from .SegmentationLogic import LanguageGuidedSegLogic, importEngine, sliceNodeForView

__all__ = ["PROTECTED_PACKAGES", "DependencyError", "LanguageGuidedSegInstallLogic", "LanguageGuidedSegParameterNode",
           "LanguageGuidedSegLogic", "importEngine", "sliceNodeForView"]
