"""Benchmarks that print figures (run through `make bench-*`); none of them is a test."""
