"""Benchmarks behind ``pimoe bench NAME``; each compares against a peer measured in the same run."""
