"""vtr's methods, one file each. ``METHODS`` maps each registered name to its plugin class."""
from .base import LLMPlugin, Plugin, Signals
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .pdrop import PyramidDrop
from .random import Random

METHODS: dict[str, type[Plugin]] = {cls.name: cls for cls in (Random, FasterVLM, DivPrune, FastV, PyramidDrop)}

__all__ = ["METHODS", "Plugin", "LLMPlugin", "Signals", "Random", "FasterVLM", "DivPrune", "FastV", "PyramidDrop"]
