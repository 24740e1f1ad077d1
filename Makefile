# Two commands for a fresh machine:  `make reproduce`  and  `make test`.
# Both run the idempotent set-up first (virtual environment, packages, kernel, dataset).
VENV ?= .venv
PROFILE ?= default
JOBS ?= auto
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup reproduce pull push compare test test-all test-fast lint profile smoke bench clean-outputs launch

setup:
	@VENV=$(VENV) bash scripts/setup.sh

## Reproduce every stage of the pipeline for the profile in params.yaml (default profile).
## JOBS stages at once (default auto: the cores, at most 4; 1 with a CUDA GPU); JOBS=1 is plain
## `dvc repro`.
reproduce: setup
	python -m calib.config params.yaml
	python -m calib.parallel --jobs $(JOBS)
	dvc metrics show
	-python -m calib.timings --by-kind

## Fetch the trained models, splits, attack records and executed notebooks from the lab's DVC
## remote instead of recomputing them (says how to add a remote when none is configured).
pull: setup
	python -m calib.remote pull

## Upload this checkout's DVC cache to the remote, for readers to `make pull`.
push: setup
	python -m calib.remote push

## After a reproduction: does every headline number lie inside the committed 95% interval?
compare: setup
	python -m calib.reproduction

## Unit, property and notebook-convention tests, plus one end-to-end smoke run of the pipeline.
test: setup
	python -m pytest -q -m "not extended"

## Also the extended runs: the paper profile on fake data at CPU scale (about 15 minutes more).
test-all: setup
	python -m pytest -q

## Everything but the end-to-end pipeline run.
test-fast: setup
	python -m pytest -q -m "not slow"

## ruff over the package, the tests, the benchmarks and the notebooks' code cells.
lint: setup
	ruff check calib tests benchmarks notebooks

## A parameter grid as one job per experiment, on Slurm or this machine (README: "More than one
## machine"):  make launch ARGS="--executor slurm -S 'attack.eps=0.02,0.05' -S 'seed=0,1'"
launch: setup
	python -m calib.launch $(ARGS)

## Switch params.yaml to a profile: make profile PROFILE=smoke|default|paper
profile:
	python -m calib.profiles $(PROFILE)

## Run the whole pipeline at smoke scale in this checkout (switches params.yaml to smoke).
smoke: setup
	python -m calib.profiles smoke
	dvc repro
