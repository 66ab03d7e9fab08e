"""Benchmark datasets: class names, prepared layouts and the pairs of image/label files to evaluate."""

from .benchmarks import (
    BENCHMARKS,
    CLASS_LIST_KEYS,
    Benchmark,
    BenchmarkError,
    Pair,
    get_benchmark,
    list_pairs,
    load_class_list,
    load_class_names,
    parse_class_list,
    parse_class_names,
    read_class_list_file,
)

__all__ = [
    "BENCHMARKS",
    "CLASS_LIST_KEYS",
    "Benchmark",
    "BenchmarkError",
    "Pair",
    "get_benchmark",
    "list_pairs",
    "load_class_list",
    "load_class_names",
    "parse_class_list",
    "parse_class_names",
    "read_class_list_file",
]
