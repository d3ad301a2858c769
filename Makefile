# moeserve — the two commands a user needs are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The embedded demo model: a tiny random Mixtral-architecture checkpoint, generated locally when missing.
DEMO_MODEL ?= .demo-model/mixtral

.PHONY: serve test install demo-model clean

# The venv is rebuilt whenever pyproject.toml changes; the stamp file records a finished install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DEMO_MODEL)/config.json: | $(VENV)/.installed
	$(VENV)/bin/moeserve demo-model $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

# Until the HTTP server lands (issue #8) `make serve` runs an offline demo: one chat completion of the demo model.
DEMO_PROMPT ?= Write a Python function that reverses a list.
serve: install demo-model
	$(VENV)/bin/moeserve generate $(DEMO_MODEL) --config configs/demo.yaml --chat --prompt "$(DEMO_PROMPT)"

# pytest exits 5 when it collected no tests; for this project that is a broken suite, so it fails loudly.
test: install
	@$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing on purpose" >&2; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) .demo-model .pytest_cache *.egg-info
