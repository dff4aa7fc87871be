"""Leaf tools every part of the core uses.

Validators of spec fields, crash-safe files and content hashes, the registry mechanism,
logging set-up, and where the project folder lives.
"""
