"""Benchmarks and the PyTorch reference model (torch is used here only, never in minidpo/)."""
