"""fiona: a rules-as-data engine that moves medical images from the hospital to research."""

__version__ = "0.1.0"
