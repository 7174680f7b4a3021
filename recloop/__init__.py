"""recloop: an orchestrated MLOps platform for interactive sequential recommendation."""

__version__ = "0.1.0"
