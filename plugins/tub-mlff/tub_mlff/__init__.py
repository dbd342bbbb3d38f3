"""tub-mlff: SpookyNet force fields and the sodium-storage workflow."""

__version__ = "0.2.0"
