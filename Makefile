# edgeai-operator developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export EDGEAI_CACHE ?= $(HOME)/.cache/edgeai

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip==25.3
	$(VENV)/bin/pip install --quiet -e '.[worker,train,dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv with the package, worker and training extras and dev tools

binaries: ## Build (or reuse) the pinned kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, OCI registry
	@bash hack/build-binaries.sh >/dev/null

test: install binaries crds-check ## Run the whole test suite (unit, data plane, real control plane)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## Tests that need no control plane
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

lint: install ## ruff check and format check; import layering (lint-imports, see pyproject.toml)
	$(VENV)/bin/ruff check operator workers tests bench
	$(VENV)/bin/ruff format --check operator workers tests bench
	$(VENV)/bin/lint-imports

format: install ## Apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix operator workers tests bench
	$(VENV)/bin/ruff format operator workers tests bench

typecheck: install ## mypy --strict on both packages
	$(VENV)/bin/mypy

cluster-up: install binaries ## Start a local control plane with kwok nodes from hack/topology.yaml
	$(VENV)/bin/edgeai cluster up --topology hack/topology.yaml

cluster-down: install ## Stop every process cluster-up started
	$(VENV)/bin/edgeai cluster down

bench-planner: install ## Planner speed, planned vs single-tier latency, digits variants
	$(PY) bench/planner/run.py

bench-dataplane: install ## Workers across device/edge/cloud network namespaces with tc-shaped links (root)
	$(PY) bench/dataplane/run.py

bench-operator: install binaries ## 500 DNNDeployments over 1000 kwok nodes: operator vs direct
	$(PY) bench/operator/run.py

bench-models: install binaries ## DNNModel apply -> Prepared time, bytes stage pods fetch vs run
	$(PY) bench/models/run.py

bench-corpus: install ## Published ONNX models: graph analysis time, cuts, planned split, served diff
	$(PY) bench/corpus/run.py

bench-training: install ## Training modes, compression, privacy, data skew; gossip vs parameter server over tc-shaped links (root)
	$(PY) bench/training/run.py

bench-protocol: install ## REST binary / REST JSON / gRPC on loopback, one and four clients; gRPC stage forwarding
	$(PY) bench/protocol/run.py --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench-tls: install ## Mutual TLS between stages vs plain HTTP per hop, 602 KB and 43 KB tensors, loopback and a tc-shaped link (root)
	$(PY) bench/tls/run.py --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench-privacy: install ## Accuracy with and without noise training, feature inversion, membership inference (digits)
	$(PY) bench/privacy/run.py --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench-privacy-he: install ## Only the homomorphic head vs the plaintext head (digits), merged into privacy.json; rewrites the planner's he_cost.json
	$(PY) bench/privacy/run.py --only he --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench-trunks: install ## Shared trunk vs separate deployments: edge compute per pair of requests (digits)
	$(PY) bench/trunks/run.py --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench-offload: install ## Always-offload vs early exits vs cascade vs cascade+reuse over tc-shaped links (root)
	$(PY) bench/offload/run.py --conditions "$${CONDITIONS:-not recorded (CONDITIONS=...)}"

bench: bench-planner bench-dataplane bench-operator bench-models bench-corpus bench-training bench-protocol bench-offload bench-tls bench-privacy bench-trunks ## All benchmarks

docs-numbers: install ## Render the README's and docs' tables of numbers from docs/results/*.json
	$(PY) bench/render_numbers.py

docs-numbers-check: install ## Fail when a table in README.md or docs/ differs from what docs/results/ renders
	$(PY) bench/render_numbers.py --check

# make lint also checks the rendered numbers (a prerequisite added on its own line).
lint: docs-numbers-check

grpc-codegen: ## Generate the OIP v2 gRPC messages' Python code from the .proto (committed; a test checks it)
	$(PY) -m grpc_tools.protoc -Iworkers/edgeai_worker/proto --python_out=workers/edgeai_worker --pyi_out=workers/edgeai_worker workers/edgeai_worker/proto/grpc_predict_v2.proto

crds: ## Copy crds/ (the one source of truth) into the Helm chart
	mkdir -p charts/edgeai-operator/crds
	cp crds/*.yaml charts/edgeai-operator/crds/

crds-check: ## Fail when the chart's CRDs drifted from crds/
	@diff -r crds charts/edgeai-operator/crds >/dev/null || { echo "charts/edgeai-operator/crds differs from crds/: run make crds"; exit 1; }

.PHONY: help install binaries test test-unit lint format typecheck cluster-up cluster-down crds crds-check grpc-codegen \
	bench bench-planner bench-dataplane bench-operator bench-models bench-corpus bench-training bench-offload bench-privacy bench-privacy-he bench-trunks docs-numbers docs-numbers-check

# Images and a local kind cluster (hack/images, hack/kind; docs/architecture.md). Root,
# Docker from Debian (hack/kind/host.sh installs and starts it), nothing from the internet
# but Debian, PyPI and the Go module proxy at build time.
images: install ## Build edgeai-operator:<version> and edgeai-worker:<version> (Debian bookworm + pinned wheels)
	hack/kind/host.sh
	PYTHON=$(abspath $(PY)) hack/images/build.sh

image-trainer: install ## Also build edgeai-trainer:<version> (DNNTrainingJob pods: the worker packages + torch; several GB)
	hack/kind/host.sh
	PYTHON=$(abspath $(PY)) hack/images/build.sh trainer

kind-up: install binaries ## A 6-node kind cluster shaped like hack/topology.yaml, images loaded (offline node image)
	PYTHON=$(abspath $(PY)) hack/kind/up.sh

kind-down: ## Delete the kind cluster kind-up made
	hack/kind/down.sh

.PHONY: images kind-up kind-down

# End to end on real pods (hack/kind/e2e.py, hack/kind/demo.py; root, Docker from host.sh).
e2e-kind: install binaries ## Real pods on kind: helm install, samples, inference, scaling, node loss, cleanup; writes docs/results/e2e-kind.json
	$(PY) hack/kind/e2e.py $(E2E_ARGS)

demo: install binaries ## From a fresh machine: kind cluster, chart, digits sample vs device-only/cloud-only, p50/p95 vs SLO
	$(PY) hack/kind/demo.py

kind-links: install ## Shape the kind nodes' device->edge and edge->cloud links with tc to their edgeai.dev/uplink-mbps
	$(PY) hack/kind/links.py $(EDGEAI_CACHE)/kind-edgeai.kubeconfig $(EDGEAI_CACHE)/k8s-v1.34.4/bin/kubectl shape

.PHONY: e2e-kind demo kind-links
