"""The Flower-free core: data, features, model, filter, metrics, store (no flwr import)."""
