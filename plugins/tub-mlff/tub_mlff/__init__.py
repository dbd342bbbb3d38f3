"""tub-mlff: SpookyNet force fields and the sodium-storage workflow."""

__version__ = "0.2.0"

from pathlib import Path

# the small model shipped for demos and tests (Na on aminobenzene-functionalised graphene): every verb's
# default --model, and ``SpookyNetCalculator("demo")``
DEMO_MODEL = Path(__file__).parent / "models" / "demo_nacnh.safetensors"
del Path

__all__ = ["DEMO_MODEL", "__version__"]
