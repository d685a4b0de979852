"""vtr's methods, one file each. ``METHODS`` maps each registered name to its plugin class."""
from .base import DecodePlugin, EncoderPlugin, LLMPlugin, Plugin, Signals
from .dart import DART
from .divprune import DivPrune
from .dycoke import DyCoke, DyCokeKV
from .evit import EViT
from .fastervlm import FasterVLM
from .fastv import FastV
from .fastvid import FastVID
from .framefusion import FrameFusion
from .framesample import FrameSample
from .globalcom2 import GlobalCom2
from .holitom import HoliTom, HoliTomInner
from .kcenter import KCenter
from .pdrop import PyramidDrop
from .pool import Pool
from .prumerge import PruMergePlus
from .prunevid import PruneVid, PruneVidMerge, PruneVidPrune
from .random import Random
from .sparsevlm import SparseVLM
from .todre import ToDRE, ToDRERelevance
from .tome import ToMe
from .uniform import Uniform
from .vispruner import VisPruner
from .visionzip import VisionZip

METHODS: dict[str, type[Plugin]] = {cls.name: cls for cls in (
    Random, Uniform, Pool, FasterVLM, VisionZip, VisPruner, DivPrune, KCenter, GlobalCom2, FastV, DART, PyramidDrop,
    SparseVLM, ToDRE, PruMergePlus,
    FrameSample, DyCoke, FastVID, HoliTom, PruneVid, FrameFusion, ToMe, EViT)}
VLM_METHODS = sorted(name for name, cls in METHODS.items() if cls.where != "encoder")
ENCODER_METHODS = sorted(name for name, cls in METHODS.items() if cls.where == "encoder")

__all__ = ["METHODS", "VLM_METHODS", "ENCODER_METHODS", "Plugin", "LLMPlugin", "EncoderPlugin", "DecodePlugin",
           "Signals", "Random", "Uniform", "Pool", "FasterVLM", "VisionZip", "VisPruner", "DivPrune", "KCenter",
           "GlobalCom2", "FastV", "DART", "PyramidDrop", "ToMe", "EViT", "FrameSample", "DyCoke", "DyCokeKV", "FastVID",
           "HoliTom", "HoliTomInner", "PruneVid", "PruneVidMerge", "PruneVidPrune", "SparseVLM",
           "ToDRE", "ToDRERelevance", "PruMergePlus", "FrameFusion"]
