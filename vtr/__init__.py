"""vtr: training-free visual token reduction for stock Hugging Face vision-language models."""
from vtr.api import Handle, methods, patch
from vtr.adapters import supported_models

__version__ = "0.1.0"
__all__ = ["patch", "methods", "Handle", "supported_models", "plugins", "__version__"]


def __getattr__(name):
    if name == "plugins":                       # vtr.plugins, importable lazily as an attribute too
        import importlib

        return importlib.import_module("vtr.plugins")
    raise AttributeError(name)
