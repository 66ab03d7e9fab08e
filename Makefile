# Entry points for people and CI. `make test` is exactly what CI runs (.ci/run).
.PHONY: help setup lint test test-fast demo demo-photos selftrain

DEMO ?= out/demo
# The demo's one training worker takes every core up to 4 (torch threads = its Ray CPUs)
DEMO_CPUS ?= $(shell n=$$(nproc); echo $$((n < 4 ? n : 4)))

DEMO_VOCABULARY ?= person;astronaut,cat,coffee cup;cup,rocket,sky,ground;grass

help:
	@echo "make setup   create/update .venv (uv or pip) with the project and its test tools"
	@echo "make lint    ruff (lint) and mypy (types), as CI runs them"
	@echo "make test    setup, then the whole test suite (what CI runs); ARGS=\"-k storage\" narrows it"
	@echo "make test-fast  the tests without Ray clusters, S3 or slow model runs (a couple of minutes)"
	@echo "make demo    setup, then the loop on a generated world whose truth is known: train the tiny model,"
	@echo "             label a lake with it, curate stats, mIoU against the hidden truth, HTML report (out/demo/)"
	@echo "make demo-photos  setup, then label 4 sample photos with random tiny weights into out/labels/"
	@echo "make selftrain    self-training vs its control on 3 seeds (scripts/selftrain.py; see docs/training.md)"

setup:
	@scripts/setup.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test:
	@scripts/test.sh $(ARGS)

test-fast:
	@scripts/test.sh -m "not cluster and not s3 and not slow" $(ARGS)

demo: setup
	rm -rf $(DEMO)
	.venv/bin/python scripts/demo_world.py write $(DEMO)/world
	.venv/bin/ebseg train --config configs/tiny_blobs.yaml --set data.train=$(DEMO)/world/labelled \
	    run.storage_path=$(DEMO)/runs run.name=demo solver.max_iter=100 run.checkpoint_period=100 \
	    run.cpus_per_worker=$(DEMO_CPUS)
	.venv/bin/ebseg label --input $(DEMO)/world/lake/images --output $(DEMO)/labels \
	    --vocabulary wall,sky,tree,grass --checkpoint $(DEMO)/runs/demo
	.venv/bin/ebseg curate stats $(DEMO)/labels
	.venv/bin/ebseg evaluate --labels $(DEMO)/labels --dataset generic --root $(DEMO)/world/lake
	.venv/bin/ebseg curate report $(DEMO)/labels --out $(DEMO)/report.html
	@echo "demo: labels in $(DEMO)/labels/, weights in $(DEMO)/runs/demo/, HTML report: $(DEMO)/report.html"

demo-photos: setup
	@.venv/bin/python scripts/demo_images.py out/demo-photos/images
	.venv/bin/python -m jobs.label --input out/demo-photos/images --output out/labels --vocabulary "$(DEMO_VOCABULARY)" --preset ebseg-tiny --random-weights
	.venv/bin/ebseg curate stats out/labels
	@echo "demo-photos: label Parquet in out/labels/ (random weights: the classes are meaningless; see docs/labeling.md)"

selftrain: setup
	.venv/bin/python scripts/selftrain.py --workdir out/selftrain-$$(date +%Y%m%d-%H%M%S) --seeds 0 1 2 --control
