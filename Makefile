# tvserve: `make serve` runs the service, `make test` runs the tests. Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# LitServe, the bench's peer (pyproject's `peers` extra): installed by `make bench` only
PEERS := $(VENV)/.peers
# pip's local-mirror notices ("... is ignored") say nothing about the install: keep them out.
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup serve test docs archives clean image image-test bench bench-smoke request-cost cluster-test deploy-check gpu-pack gpu-check

$(INSTALLED): pyproject.toml
	@scripts/check_java.sh
	@scripts/check_ffmpeg.sh
	@command -v $(PYTHON) >/dev/null || { echo "tvserve needs $(PYTHON): install Python 3.11 and retry." >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing tvserve and its pinned dependencies into $(VENV) (first run: several minutes) ..."
	$(BIN)/pip install -q -e '.[test,docs]' $(PIP_QUIET)
	@touch $@

setup: $(INSTALLED)

$(PEERS): $(INSTALLED)
	@echo "Installing LitServe, the bench's peer (the peers extra), into $(VENV) ..."
	$(BIN)/pip install -q -e '.[test,peers]' $(PIP_QUIET)
	@touch $@

archives: setup  ## the default archives, built only where missing
	$(BIN)/tvserve prepare

serve: archives  ## TorchServe in the foreground on 127.0.0.1:8080/8081/8082; Ctrl-C stops it
	$(BIN)/tvserve serve

test: setup  ## the whole suite, against real TorchServe processes on free loopback ports
	@scripts/check_java.sh
	$(BIN)/pytest

docs: setup  ## the documentation site, docs/ -> .tvserve/site/ (MkDocs; --strict: no broken link or anchor)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # (the variable quiets Material's notice about MkDocs 2.0)

bench: setup $(PEERS)  ## in-process vs tvserve (pipelined and serial) vs stock TorchServe vs LitServe, side by side (~55 min); writes benchmarks/latest.md
	$(BIN)/tvserve bench --systems tvserve,serial,draft,int8,stock,litserve

request-cost: setup  ## CPU ms per request, stage by stage, Net and resnet18 (~8 min); writes benchmarks/request_cost.md
	$(BIN)/python -m tvserve.tools.request_cost

bench-smoke: setup  ## a seconds-long bench run that checks the harness works (CI)
	$(BIN)/tvserve bench --smoke

gpu-pack: setup  ## .gpu/ for the lent GPU machine: Python 3.12 packages, TorchServe's frontend with a jlink'd Java, wrk (44 MB)
	PIP=$(BIN)/pip scripts/gpu/deps.sh

gpu-check: gpu-pack  ## scripts/gpu/measure.sh here on the CPU, small (~2 min): the carried frontend serves over HTTP
	OUT=.tvserve/gpu-check PYTHON=$(BIN)/python MODELS=resnet18 BATCHES=1 PRECISIONS=fp32 CONCURRENCY=1,4 scripts/gpu/measure.sh

image:  ## the container image, localhost/tvserve:latest (buildah: no Docker engine needed)
	scripts/container/build.sh

image-test: image  ## run the image, predict from the host with its token, stop it, check it stopped cleanly
	scripts/container/test.sh

cluster-test: setup  ## 3 replicas behind HAProxy: kill -9, rolling update 1.0 -> 2.0, throughput (~6 min; needs haproxy, wrk)
	$(BIN)/python -m tvserve.tools.cluster --json .tvserve/cluster.json

deploy-check: setup  ## deploy/: render, validate against Kubernetes' and KServe's schemas, lint with checkov
	$(BIN)/pytest tests/test_deploy.py -q
	scripts/deploy/lint.sh

clean:
	rm -rf .tvserve runs model_store/*.mar
