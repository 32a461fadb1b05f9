"""`python -m benchmarks.reproduce ...`: see benchmarks/reproduce/__init__.py."""

from benchmarks.reproduce.cli import main

main()
