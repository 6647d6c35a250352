"""cnai: Chinese-aware AI indexing for Immich. This package is the composition root: settings, CLI, wiring."""
__version__ = "0.1.0"
