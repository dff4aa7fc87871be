"""Operations: the ``docl-flower`` command, simulations, deployments, ``filter check``."""
