# Entry points for people and CI. `make test` is exactly what CI runs (.ci/run).
.PHONY: help setup test test-fast demo

DEMO_VOCABULARY ?= person;astronaut,cat,coffee cup;cup,rocket,sky,ground;grass

help:
	@echo "make setup   create/update .venv (uv or pip) with the project and its test tools"
	@echo "make test    setup, then the whole test suite (what CI runs); ARGS=\"-k storage\" narrows it"
	@echo "make test-fast  the tests without Ray clusters, S3 or slow model runs (a couple of minutes)"
	@echo "make demo    setup, then label 4 sample photos with the tiny model into out/labels/"

setup:
	@scripts/setup.sh

test:
	@scripts/test.sh $(ARGS)

test-fast:
	@scripts/test.sh -m "not cluster and not s3 and not slow" $(ARGS)

demo: setup
	@.venv/bin/python scripts/demo_images.py out/demo/images
	.venv/bin/python -m jobs.label --input out/demo/images --output out/labels --vocabulary "$(DEMO_VOCABULARY)" --preset ebseg-tiny --random-weights
	.venv/bin/ebseg curate stats out/labels
	@echo "demo: label Parquet in out/labels/ (random weights: the classes are meaningless; see docs/labeling.md)"
