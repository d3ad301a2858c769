# moeserve — the two commands a user needs are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The embedded demo model: the trained demo MoE committed in models/demo-moe (see its README.md). A DEMO_MODEL
# directory that does not exist (e.g. DEMO_MODEL=.demo-model/mixtral) gets a tiny random Mixtral checkpoint.
DEMO_MODEL ?= models/demo-moe

.PHONY: serve test install demo-model clean

# The install steps live in scripts/install.sh, which the Dockerfile runs too.
# The venv is rebuilt whenever pyproject.toml (or the install script) changes; the stamp file records a finished install.
$(VENV)/.installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=test bash scripts/install.sh deps
	touch $@

# The compiled CPU experts kernel (engine/offload/kernels/); without it the engine runs its pure-torch path.
KERNEL_STAMP := engine/offload/kernels/_build/fingerprint.txt
$(KERNEL_STAMP): engine/offload/kernels/experts_cpu.cpp $(VENV)/.installed
	VENV=$(VENV) bash scripts/install.sh kernel
	touch $@

install: $(VENV)/.installed $(KERNEL_STAMP)

$(DEMO_MODEL)/config.json: | $(VENV)/.installed
	$(VENV)/bin/moeserve demo-model $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

# The OpenAI-compatible server on 127.0.0.1:8000, serving the demo model (Ctrl-C or SIGTERM stops it).
serve: install demo-model
	$(VENV)/bin/moeserve serve $(DEMO_MODEL) --config configs/demo.yaml

# pytest exits 5 when it collected no tests; for this project that is a broken suite, so it fails loudly.
test: install
	@$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing on purpose" >&2; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) .demo-model .pytest_cache *.egg-info engine/offload/kernels/_build
