"""What a user's device trains.

The one-class autoencoder, its recipe (optimisers, schedulers, augmentation), DP-SGD, and
the calibration of the privacy interval's ``mu`` and ``sigma``.
"""
