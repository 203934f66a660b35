"""Helpers for testing modse-megatron (and code built on it) on real gloo process groups."""
