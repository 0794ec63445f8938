"""Prints which torch and which interpreter it runs with."""

import sys

import torch

print(f"torch {torch.__version__} at {torch.__file__}")
print(f"python {sys.executable}")
