"""tub-pathorob: PathoROB robustness metrics for pathology foundation-model features."""

__version__ = "0.1.0"
