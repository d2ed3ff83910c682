"""Template visguard plugin: the ``oneword`` guard format and the ``csv`` benchmark."""

from visguard_example_plugin.benchmark import CsvBenchmark
from visguard_example_plugin.format import OneWordFormat

__all__ = ["CsvBenchmark", "OneWordFormat"]
