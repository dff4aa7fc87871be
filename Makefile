# Two-command quickstart: `make run` and `make test` (each creates .venv when missing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test lint docs bench scale report recipes figures faces calibration compare privacy deploy-demo serve-bench robustness clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,extractors]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/docl-flower $(ARGS)

# Two phases (tests/conftest.py). First two pytest sessions side by side, one per core: the
# "serial" tests (Flower's managed SuperLink, Ray heads, timed processes) one after another, and
# the rest; the serial session's output follows the other's. Then the "alone" tests (the
# deployment fault test) by themselves. The exit status is the worst of the three (a session
# that selects no test, e.g. with PYTEST_ARGS=tests/test_deploy.py, counts as passed: pytest's
# status 5).
test: $(STAMP)
	@rm -f .test-serial.log; \
	$(BIN)/python -m pytest -m serial $(PYTEST_ARGS) > .test-serial.log 2>&1 & serial=$$!; \
	$(BIN)/python -m pytest -m "not serial and not alone" $(PYTEST_ARGS); rest=$$?; \
	wait $$serial; status=$$?; \
	echo "---------------- the serial tests (tests/conftest.py: SERIAL) ----------------"; \
	cat .test-serial.log; \
	echo "---------------- the tests run alone (tests/conftest.py: ALONE) ----------------"; \
	$(BIN)/python -m pytest -m alone $(PYTEST_ARGS); alone=$$?; \
	worst=0; for s in $$rest $$status $$alone; do \
	  [ $$s -ne 5 ] && [ $$s -gt $$worst ] && worst=$$s; \
	done; exit $$worst

lint: $(STAMP)
	$(BIN)/ruff check docl_flower tests scripts
	$(BIN)/ruff format --check docl_flower tests scripts
	$(BIN)/mypy

# The documentation site (MkDocs, Material theme) from docs/ and mkdocs.yml, offline and strict:
# a warning, a broken link or anchor included, fails it. NO_MKDOCS_2_WARNING silences Material's
# notice about MkDocs 2.0, which is not a warning about these docs.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

report: $(STAMP)
	$(BIN)/python scripts/report.py $(RESULTS)

# The four-way comparison of features x training recipe shown in the README.
recipes: $(STAMP)
	rm -rf multirun/recipes
	$(BIN)/docl-flower -m features=identity,deskew train=paper,default hydra.sweep.dir=multirun/recipes
	$(BIN)/python scripts/sweep_table.py multirun/recipes

# The paper's evaluation (Fig. 2-5), imbalance, and the strict Guard: PNGs + figures/summary.md.
figures: $(STAMP)
	$(BIN)/python scripts/figures.py --out figures $(FIGURES_ARGS)

# The paper's face experiment on ORL: 5 draws of 10 of 40 people; face, ImageNet and pixel
# features; Guard trade-off, adversaries, scalability: PNGs + faces/summary.md.
faces: $(STAMP)
	$(BIN)/python scripts/faces.py --out faces --extra train.min_steps=1000 $(FACES_ARGS)

# The Guard calibrated to a stated acceptance rate (guard.target_acceptance, split conformal):
# MNIST, ORL faces and DP (epsilon 8), 5 seeds, targets 0.95/0.98/0.99: calibration/summary.md.
calibration: $(STAMP)
	$(BIN)/python scripts/calibration.py --out calibration $(CALIBRATION_ARGS)

# Edited re-uploads (JPEG, resize, crops, rotations, flip, brightness, noise) of registered
# users' photos: the share the calibrated Guard blocks, for face, ImageNet and pixel features.
robustness: $(STAMP)
	$(BIN)/python scripts/robustness.py --out robustness $(ROBUSTNESS_ARGS)

# DOCL vs FedAvg / FedProx (one class per user and IID) vs centralised: table + plot.
compare: $(STAMP)
	$(BIN)/python scripts/compare.py --out comparison $(COMPARE_ARGS)

# What the server learns from the uploads (inversion, membership inference) without and with
# differential privacy (epsilon 1, 4, 8), on MNIST and ORL faces: privacy/summary.md + JSON + PNGs.
privacy: $(STAMP)
	$(BIN)/python scripts/privacy.py --out privacy $(PRIVACY_ARGS)

# A local deployment (SuperLink + 10 SuperNodes on 127.0.0.1, TLS + SuperNode auth).
deploy-demo: $(STAMP)
	$(BIN)/python scripts/deploy_demo.py --users 10 --out deploy $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench_filter.py

# The upload service under load: the real `docl-flower filter serve` on 127.0.0.1 at 1, 8 and 64
# concurrent clients, filters of 10 and 1,000 autoencoders (and the ORL face filter), against
# deciding.decide in process; reloads under load: serve/bench.md + bench.json. Batching sweep:
# SERVE_BENCH_ARGS=--sweep.
serve-bench: $(STAMP)
	$(BIN)/python scripts/serve_bench.py --out serve $(SERVE_BENCH_ARGS)

# 10, 100 and 1,000 simulated users (about 60 MNIST images each) through Flower and Ray, next
# to a plain PyTorch loop; plus the default experiment both ways: scale/summary.md + JSON.
scale: $(STAMP)
	$(BIN)/python scripts/bench_scale.py --out scale $(SCALE_ARGS)

clean:
	rm -rf outputs multirun .flwr .pytest_cache .mypy_cache .ruff_cache
