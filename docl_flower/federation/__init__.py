"""The Flower layer: ClientApp, ServerApp, strategies and workflows (imports the core only)."""
