# driver-plugin: every developer and CI entry point.
# `make demo` and `make test` need only python3 (>= 3.11) and make; the rest say what they need.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
IMAGE  ?= driver-plugin:0.1.0

.PHONY: demo test lint typecheck pytest configmap check-configmap conformance server-conformance loop loop-packages image e2e bench clean

# Go is for the harnesses that run Argo's own code, never for the product.
GO           ?= go
BUILD        := .build
# The Argo v4 release every harness runs: the one harness/conformance/agent-v4/go.mod requires.
ARGO_VERSION := $(shell sed -n 's|^\(require\)\{0,1\}[[:space:]]*github.com/argoproj/argo-workflows/v4 \(v[^ ]*\).*|\2|p' harness/conformance/agent-v4/go.mod)
ARGO_BIN     := $(BUILD)/argo-$(ARGO_VERSION)
# The Argo v3 release KFP installs: the one harness/conformance/agent-v3/go.mod requires.
ARGO_V3_VERSION := $(shell sed -n 's|^\(require\)\{0,1\}[[:space:]]*github.com/argoproj/argo-workflows/v3 \(v[^ ]*\).*|\2|p' harness/conformance/agent-v3/go.mod)
AGENTS       := $(BUILD)/conformance/agent-v4 $(BUILD)/conformance/agent-v3
GO_PREFLIGHT  = command -v $(GO) >/dev/null || { echo "make $@: needs Go >= 1.25 on PATH (https://go.dev/dl); the Python tests (make test) do not" >&2; exit 1; }

## demo: mock kfp-driver-server + plugin on loopback, the calls of a KFP hello-world run
demo:
	$(PYTHON) -m harness.demo

## test: install the pinned dev tools into .venv, then lint, type-check and run every test
test: lint typecheck pytest

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

typecheck: $(VENV)/.installed
	$(VPY) -m mypy

pytest: $(VENV)/.installed
	$(VPY) -m pytest

## configmap: write the plugin ConfigMap from plugin.yaml with Argo's own `argo executor-plugin
## build`: the argo CLI on PATH, else Argo's command built from harness/argo-cli (needs Go). It runs
## on a copy of plugin.yaml in a temporary directory: the build also writes a README.md there.
## check-configmap: the same build, failing with a diff when the committed file differs at all
CONFIGMAP := driver-plugin-executor-plugin-configmap.yaml
ARGO      ?= $(or $(shell command -v argo),$(ARGO_BIN)/argo)
configmap check-configmap: $(filter $(ARGO_BIN)/argo,$(ARGO))
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp plugin.yaml "$$tmp/" && \
	$(ARGO) executor-plugin build "$$tmp" >/dev/null && \
	if [ $@ = configmap ]; then \
	  if cmp -s "$$tmp/$(CONFIGMAP)" $(CONFIGMAP); then echo "$(CONFIGMAP): unchanged"; \
	  else cp "$$tmp/$(CONFIGMAP)" $(CONFIGMAP) && echo "$(CONFIGMAP): rewritten by $(ARGO)"; fi; \
	else diff -u $(CONFIGMAP) "$$tmp/$(CONFIGMAP)" || { \
	  echo "make $@: $(CONFIGMAP) is not what $(ARGO) writes: run make configmap" >&2; exit 1; }; fi

## image: build the distroless image (needs docker)
image:
	docker build -t $(IMAGE) .

## e2e: kind cluster + Argo + mock driver server + real workflows (needs docker, kind, kubectl)
e2e:
	IMAGE=$(IMAGE) bash harness/e2e/run.sh

## bench: latency/throughput/RSS through the plugin against the direct path (installs wrk, nginx)
bench: $(VENV)/.installed
	$(VPY) -m harness.bench.run

## conformance: Argo's own agent (v4 and v3 lines, built from the module proxy) drives the real plugin
conformance: $(AGENTS)
	$(PYTHON) -m harness.conformance.suite --line argo-$(ARGO_VERSION)=$(BUILD)/conformance/agent-v4 \
	    --line argo-$(ARGO_V3_VERSION)=$(BUILD)/conformance/agent-v3

## server-conformance: a kfp-driver-server checked against docs/driver-server-contract.md through the
## real plugin. UPSTREAM=<url> checks that server (SERVER_FLAGS adds e.g. --sa-token FILE
## --foreign-namespace NS, --ca-file FILE, --mock-knobs); without it the mock must pass and each mock
## that breaks the key contract (harness/mock_driver_server.py --break-keys) must fail a case. Python only.
SERVER_FLAGS ?=
server-conformance:
	$(PYTHON) -m harness.conformance.server $(if $(UPSTREAM),--upstream $(UPSTREAM),--prove) $(SERVER_FLAGS)

$(BUILD)/conformance/agent-%: harness/conformance/agent.go harness/conformance/agent-%/argo.go harness/conformance/agent-%/go.mod harness/conformance/agent-%/go.sum
	@$(GO_PREFLIGHT)
	cd harness/conformance/agent-$* && $(GO) build -trimpath -o $(abspath $@) .

## loop: KFP-shaped workflows through a real kube-apiserver, Argo's controller and agent, and the
## plugin, on a real node: kubelet, kube-proxy, kube-scheduler, containerd, runc, CNI bridge,
## CoreDNS, and images built here (harness/loop/run.py says what is real; needs Go, root, Debian packages)
LOOP_KUBE := $(BUILD)/loop/kube
LOOP_COREDNS := $(BUILD)/loop/coredns
LOOP_PLUGIN_IMAGE := $(BUILD)/loop/images/driver-plugin.tar
LOOP_LINES := $(ARGO_VERSION) $(ARGO_V3_VERSION)
LOOP_PACKAGES := containerd runc containernetworking-plugins busybox-static iproute2 iptables
## KFP's compiled workflows (never copied into the repository) run after the fixed rows: every
## one on the first line, harness/loop/kfp.py's selection on the others. WORKFLOW=<file ...>
## [EXPECT=<phase>] runs only those, adapted to the loop's profile.
KFP_WORKFLOWS ?= $(abspath ../shared/kfp/compiled-workflows)
EXPECT ?= Succeeded
loop: $(VENV)/.installed loop-packages $(LOOP_KUBE) $(LOOP_COREDNS) $(LOOP_PLUGIN_IMAGE) $(ARGO_BIN)/argo $(foreach v,$(LOOP_LINES),$(BUILD)/argo-$(v)/workflow-controller $(BUILD)/argo-$(v)/argoexec)
	for version in $(LOOP_LINES); do \
	  $(VPY) -m harness.loop.run --kube $(LOOP_KUBE) --coredns $(LOOP_COREDNS) --plugin-image $(LOOP_PLUGIN_IMAGE) \
	    --argo-bin $(BUILD)/argo-$$version --argo-version $$version --go $(GO) --argo-cli $(ARGO_BIN)/argo \
	    --kfp-workflows $(KFP_WORKFLOWS) $$([ $$version = $(firstword $(LOOP_LINES)) ] && echo --kfp-corpus) \
	    $(foreach w,$(WORKFLOW),--workflow $(abspath $(w))) $(if $(WORKFLOW),--expect $(EXPECT)) || exit 1; \
	done

## loop-packages: the node's runtime from Debian bookworm (containerd 1.6.20, runc 1.1.5, CNI
## plugins 1.1.1, the static busybox the images are made of), installed with apt when missing
loop-packages:
	@missing=$$(for p in $(LOOP_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | \
	  grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "make loop: needs these Debian packages: $$missing" >&2; exit 1; }; \
	  echo "make loop-packages: apt-get install $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing >/dev/null; }; \
	fi

## $(LOOP_KUBE): etcd, kube-apiserver, kube-controller-manager, kubectl and kubelet in one binary (harness/loop/kube)
# The version the programs report (the node's kubeletVersion, /version): the module's release.
KUBE_VERSION := $(shell sed -n 's|^[[:space:]]*k8s.io/kubernetes \(v[^ ]*\)$$|\1|p' harness/loop/kube/go.mod)
KUBE_LDFLAGS := -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
  -X k8s.io/component-base/version.gitMajor=$(word 1,$(subst ., ,$(KUBE_VERSION:v%=%))) \
  -X k8s.io/component-base/version.gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION:v%=%)))
$(LOOP_KUBE): harness/loop/kube/go.mod harness/loop/kube/go.sum $(wildcard harness/loop/kube/*.go)
	@$(GO_PREFLIGHT)
	cd harness/loop/kube && $(GO) build -trimpath -ldflags '$(KUBE_LDFLAGS)' -o $(abspath $@) .

## $(LOOP_COREDNS): CoreDNS from its module, with the plugins the loop's Corefile uses
$(LOOP_COREDNS): harness/loop/coredns/go.mod harness/loop/coredns/go.sum harness/loop/coredns/main.go
	@$(GO_PREFLIGHT)
	cd harness/loop/coredns && $(GO) build -trimpath -o $(abspath $@) .

## $(LOOP_PLUGIN_IMAGE): the plugin's image by the Dockerfile's recipe, on a base unpacked from
## the Debian 13 packages distroless python3-debian13 is made of (harness/loop/images.py names them;
## apt downloads them once into $(BUILD)/loop/trixie with a configuration of its own)
$(LOOP_PLUGIN_IMAGE): Dockerfile driver_plugin.py harness/loop/images.py
	$(PYTHON) -m harness.loop.images $(shell sed -n 's/^ *image: *//p' $(CONFIGMAP) | head -1) $@ $(BUILD)/loop/trixie

## $(ARGO_BIN)/argo: Argo's `argo executor-plugin` command alone (harness/argo-cli/main.go says why
## `go install .../cmd/argo` cannot build the whole CLI)
$(ARGO_BIN)/argo: harness/argo-cli/go.mod harness/argo-cli/go.sum harness/argo-cli/main.go
	@$(GO_PREFLIGHT)
	cd harness/argo-cli && $(GO) build -o $(abspath $@) .

## $(BUILD)/argo-<version>/<cmd>: Argo's own argoexec or workflow-controller, built from the
## released module (v4 or v3, from the version) with its own go.mod, in a copy of its tree. The
## copy is there for one file: in Argo's repository workflow/executor/osspecific/signal_linux.go
## is a symlink to signal_darwin.go, module zips leave symlinks out, and without it argoexec fails
## on Linux with "undefined: Setpgid" (`go install ...@version` cannot build it; `-overlay` may not
## touch the module cache). The copy puts that one link back; nothing else changes.
$(BUILD)/argo-%/source/go.mod: harness/conformance/agent-v4/go.mod harness/conformance/agent-v3/go.mod
	@$(GO_PREFLIGHT)
	rm -rf $(@D) && mkdir -p $(dir $(@D)) && \
	  dir=$$($(GO) mod download -json github.com/argoproj/argo-workflows/$(firstword $(subst ., ,$*))@$* | \
	  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p') && cp -R "$$dir" $(@D) && chmod -R u+w $(@D)
	ln -s signal_darwin.go $(@D)/workflow/executor/osspecific/signal_linux.go

# Not an intermediate file that make may delete once the binaries are built.
.PRECIOUS: $(BUILD)/argo-%/source/go.mod

$(BUILD)/argo-%/workflow-controller: $(BUILD)/argo-%/source/go.mod
	cd $(<D) && $(GO) build -trimpath -o $(abspath $@) ./cmd/workflow-controller

# Static, as Argo's release builds it: init containers copy it into executor pods of any image.
$(BUILD)/argo-%/argoexec: $(BUILD)/argo-%/source/go.mod
	cd $(<D) && CGO_ENABLED=0 $(GO) build -trimpath -o $(abspath $@) ./cmd/argoexec

clean:
	rm -rf $(VENV) $(BUILD) .pytest_cache .mypy_cache .ruff_cache .hypothesis harness/bench/results
