"""Lightning callbacks of ditprune, imported as ``ditprune.callbacks``."""

from .pruning import DiTPruning

__all__ = ["DiTPruning"]
