"""DOCL's peers without Flower.

FedAvg-family classifiers (2NN, CNN) and one-shot per-class feature statistics (FedPFT).
"""
