# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv/ on first use. TORCH_SPEC defaults to the CPU build of this workplace;
# on a GPU machine install your CUDA torch first and run `make TORCH_SPEC=torch ...`.
PY := .venv/bin/python
STAMP := .venv/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf data/demo outputs/demo
