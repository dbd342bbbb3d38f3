"""tub-atlas: offline, timm-free pathology ViT encoders (Atlas 2 family and peers)."""

__version__ = "0.2.0"
