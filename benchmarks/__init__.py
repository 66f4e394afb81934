"""Benchmarks of the flexkern MoE layer and its routing (run as ``python -m benchmarks.bench_moe``)."""
