# The two set-up commands of the README: `make demo` and `make test`. Both create .venv/ on first
# use and install the project (`pip install -e .`) at the exact versions of requirements.lock.
# TORCH_SPEC defaults to the CPU build of this workplace; on a GPU machine install your CUDA torch
# first and run `make TORCH_SPEC=torch ...`.
# CI (.ci/run) also runs the suite on the newest versions pyproject.toml allows (test-newest) and
# on its oldest transformers (test-oldest), each in a venv of its own.
PY := .venv/bin/python
STAMP := .venv/.installed
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
OLDEST_TRANSFORMERS := transformers==5.17.0
# DeepSpeed (ZeRO-3 and Ulysses SP tests) builds no ops on CPU; without build isolation its setup
# sees the installed torch instead of fetching another into a build environment
DEEPSPEED = DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q --no-build-isolation
# the tested version prints of the extra runs
VERSIONS := grep -iE "^(torch|transformers|accelerate|datasets|tokenizers|huggingface.hub|numpy|protobuf|deepspeed) "

.PHONY: demo test test-fast test-newest test-oldest lock clean-demo

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	$(call DEEPSPEED,.venv) -c $(LOCK) deepspeed
	touch $@

demo: $(STAMP)
	bash scripts/demo.sh

# every tier (all run on CPU); test-fast: the unit tier only (markers in pyproject.toml). Files are
# spread over one pytest-xdist worker per core, one thread each (tests/conftest.py).
XDIST := -n auto --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not (integration or subprocess or distributed or slow)" tests

# venv NAME, torch as TORCH_SPEC, then the project with EXTRA pip arguments; torch stays as installed
define fresh_venv
	rm -rf $(1) && python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(1)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(1)/torch-constraint.txt
	$(1)/bin/python -m pip install -q -c $(1)/torch-constraint.txt $(2) -e ".[test]"
	$(call DEEPSPEED,$(1)) -c $(1)/torch-constraint.txt $(2) deepspeed
	$(1)/bin/python -m pip list 2>/dev/null | $(VERSIONS)
endef

test-newest:
	$(call fresh_venv,.venv-newest,--upgrade --upgrade-strategy eager)
	.venv-newest/bin/python -m pytest -q $(XDIST) tests

test-oldest:
	$(call fresh_venv,.venv-oldest,"$(OLDEST_TRANSFORMERS)")
	.venv-oldest/bin/python -m pytest -q $(XDIST) tests

# Re-make requirements.lock from the newest versions the ranges allow today (then review the diff).
lock:
	$(call fresh_venv,.venv-lock,--upgrade --upgrade-strategy eager)
	( echo "# Exact versions the README's two commands install (pip constraints: pip install -c requirements.lock ...)."; \
	  echo "# Made with 'make lock' on $$(date +%F) (torch installed first from TORCH_SPEC, not pinned here)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -iE "^(torch|longalign)==" ) > $(LOCK)
	rm -rf .venv-lock

clean-demo:
	rm -rf data/demo outputs/demo
