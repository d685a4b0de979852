"""Video support: frame sampling (``load_video``); temporal reduction methods come next."""
from .io import Video, load_video

__all__ = ["Video", "load_video"]
