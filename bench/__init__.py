"""Benchmarks, installed as `pudl.bench` and run with `pudl bench NAME [--json]`.

Each module has `run(tiny: bool = False) -> dict` (tiny = a seconds-long smoke size for the test suite) and
`lines(result) -> list[str]` for the human-readable summary.
"""
