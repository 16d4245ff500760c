"""Measurements outside the test suite, each a script that prints one JSON object; three kinds:

- perf/: speed and traffic of one part (packing, data pipeline, model step, collectives); `make bench`.
- experiments/: long measurements of the method itself (quality.py: SSiT against MoCo v3 and random init).
- checks/: end-to-end correctness on hardware the test suite does not have (gpu_check.py; `make gpu-check`).

A package only so that tests can import what they pin (tests/bench/test_bench_baseline.py); run the scripts
as `python bench/KIND/NAME.py`.
"""
