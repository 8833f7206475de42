"""rankwise benchmarks: scripts that time and measure memory, writing JSON under
benchmarks/results/. Run one with ``python -m benchmarks.bench_lora``."""
