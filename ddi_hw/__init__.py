"""ddi-hw: energy-aware dual dynamic inference on CNN accelerators."""

__version__ = "0.1.0"
