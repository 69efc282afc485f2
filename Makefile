# sbe: the two quick-start targets are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SBE    := $(VENV)/bin/sbe
GUESTS := build/guests

.PHONY: setup guests demo test bench clean

# Bytecode is compiled here, as pip does for an installed package: an editable
# install leaves it to the first run, and where PYTHONDONTWRITEBYTECODE is set every
# run would compile sbe again (70 ms of each start).
setup: $(VENV)/.installed build/.native
	@$(PY) -m compileall -q __init__.py __main__.py handlers meta monitor patcher scanner >/dev/null

# The editable install's import hook (a finder that maps the package `sbe` onto this
# directory) costs every start 13 ms of imports; a plain path entry holding a link
# named sbe to this directory finds the same files, new ones included, for nothing.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	mkdir -p $(VENV)/src && ln -sfn $(CURDIR) $(VENV)/src/sbe
	$(PY) -c 'import glob, sys, sysconfig; [open(p, "w").write(sys.argv[1] + "\n") for p in glob.glob(sysconfig.get_paths()["purelib"] + "/__editable__.scan_before_execute-*.pth")]' $(CURDIR)/$(VENV)/src
	touch $@

# The C scanner (scanner/region.c, built with cffi against the capstone wheel's own
# libcapstone.so and headers); without it sbe scans with scanner/region.py.
build/.native: $(VENV)/.installed scanner/region.c monitor/owncpuid.c tools/build_native.py
	$(PY) tools/build_native.py
	@mkdir -p build && touch $@

guests:
	$(MAKE) -s -C guests OUT=$(abspath $(GUESTS))

demo: setup guests
	@echo '== native: $(GUESTS)/branches'
	@$(GUESTS)/branches
	@echo '== sbe run --mode patch --stats -- $(GUESTS)/branches'
	$(SBE) run --mode patch --stats --sites-out build/demo-sites.json -- $(GUESTS)/branches
	@echo '== sbe sites build/demo-sites.json --module branches'
	$(SBE) sites build/demo-sites.json --module branches

test: setup guests
	$(PY) -m pytest -q

# Not part of `make test`: a full run takes long (emulate mode on trap-heavy workloads).
bench: setup guests
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check 'matplotlib>=3'
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf build $(VENV)
