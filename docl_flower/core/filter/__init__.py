"""The global filter on the provider's side.

Stacked scoring (PyTorch, or the native fused kernel), the Guard, the server's probe check of
every upload, and the signed on-disk store with its writer lock.
"""
