"""Correctness checks on hardware the test suite does not have: gpu_check.py (`make gpu-check`)."""
