"""Benchmarks, run by ``make bench``. Each module measures heapsync against a ceiling in the same run."""
