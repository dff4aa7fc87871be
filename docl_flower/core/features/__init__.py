"""The provider's feature extractors (images to features in [0, 1]) and their on-disk cache."""
