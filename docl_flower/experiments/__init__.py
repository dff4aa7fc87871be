"""Experiments as a tested package; each ``scripts/`` file is a thin command on top.

The paper's figures, the attacks, the comparison with the baselines, the benchmarks and the
launch-and-measure helpers.

The top layer: it may import the core, the Flower layer and operations; nothing imports it.
"""
