# One command to install and run the demo, one to run the tests.
#   make demo    create .venv, install medanomaly with pinned dependencies, run the phantom demo
#   make test    same install, then the test suite
#   make docs    same install, then the documentation site in site/ (mkdocs --strict)
# A GPU user installs a CUDA build of torch into .venv first (or sets TORCH=...); an installed
# torch is never replaced.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint docs benchmark clean update-viewer

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --disable-pip-version-check -c constraints.txt -e ".[dev,docs]"
	touch $(STAMP)

demo: install
	$(BIN)/medanomaly demo --out demo_out

test: install
	$(BIN)/pytest

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: install
	$(BIN)/ruff check src tests benchmarks docs/*.py .ci/*.py
	$(BIN)/ruff format --check src tests benchmarks docs/*.py .ci/*.py

benchmark: install
	$(BIN)/python benchmarks/prepare_head_ct.py --out runs/head_ct
	$(BIN)/medanomaly compare --spec head_ct --out runs/compare_head_ct

# The report viewer's NiiVue bundle (src/medanomaly/reports/static/README.md): npm pack, no node_modules.
NIIVUE ?= 0.69.0
STATIC := src/medanomaly/reports/static
update-viewer:
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent @niivue/niivue@$(NIIVUE) >/dev/null \
	  && tar xzf niivue-niivue-$(NIIVUE).tgz package/dist/niivue.umd.js \
	  && cp package/dist/niivue.umd.js $(CURDIR)/$(STATIC)/niivue.umd.js && rm -rf $$tmp
	printf '@niivue/niivue %s\nfile: package/dist/niivue.umd.js of `npm pack @niivue/niivue@%s`\nsha256: %s\n' \
	  $(NIIVUE) $(NIIVUE) $$(sha256sum $(STATIC)/niivue.umd.js | cut -d' ' -f1) > $(STATIC)/NIIVUE_VERSION.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache site dist
