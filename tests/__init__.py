"""Test suite; ``tests.corpus`` holds the synthetic image helpers the tests share."""
