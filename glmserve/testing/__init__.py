"""Helpers for tests and benchmarks: small random checkpoints in the real GLM-4.5 layout, a scripted runner, a
server process."""
