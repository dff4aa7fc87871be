"""Image data sets and the per-user partitions of the paper.

IDX archives (MNIST, Fashion-MNIST), image folders (ORL faces), CIFAR-10; the isolated
decoder of untrusted image files; partitions; per-client seed derivation.
"""
