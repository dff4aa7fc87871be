"""The experiment assembled from the config: the top of the core.

Typed specs (validated once), the table of every named component, the inputs the server and
a user's client see, one user's fit, and the plain loop without Flower.
"""
