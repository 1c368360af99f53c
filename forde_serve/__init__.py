"""forde-serve inference side: numpy (+ onnxruntime, + BentoML for the service).

This package never imports torch; `training` may import it, never the reverse.
"""

from forde_serve.metrics import classification_metrics, gradient_cosine_distance, uncertainty

# The package version: pyproject.toml reads it from here (setuptools dynamic), so it is written once.
__version__ = "0.1.0"
__all__ = ["__version__", "classification_metrics", "gradient_cosine_distance", "uncertainty"]
