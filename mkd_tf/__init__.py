"""mkd-tf: cross-modality segmentation with online Mutual Knowledge Distillation (TF2 / Keras 3)."""

__version__ = "0.1.0"
