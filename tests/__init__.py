"""Test suite; ``ebseg_core.data.synthetic`` holds the synthetic image helpers the tests share."""
