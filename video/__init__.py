"""Video loading and temporal token reduction. Not implemented yet: the image engine lands first."""
