"""vtr: training-free visual token reduction for stock Hugging Face vision-language models."""
from vtr import plugins
from vtr.adapters import supported_models
from vtr.api import Handle, methods, patch

__version__ = "0.1.0"
__all__ = ["patch", "methods", "Handle", "supported_models", "plugins", "__version__"]
