"""Speed and traffic benchmarks, a few minutes each on a CPU; `make bench` runs them all."""
