"""tub-xmil: whole-slide multiple instance learning with faithful explanations (xMIL)."""

__version__ = "0.2.0"
