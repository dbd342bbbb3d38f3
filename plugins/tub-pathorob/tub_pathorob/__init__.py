"""tub-pathorob: PathoROB robustness metrics for pathology foundation-model features."""

__version__ = "0.2.0"
