"""The top layer: the command line, the experiment runner, studies and benchmarks."""
