"""The package version (read by the build backend and recorded in adapter files)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
