"""Benchmarks (``nh-serve bench ...``). Nothing in nh_serve imports this package except the command line."""
