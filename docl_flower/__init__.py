"""docl-flower: Distributed One-Class Learning (DOCL) on Flower."""

__version__ = "0.1.0"
