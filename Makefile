# One place for the set-up and the two quick-start jobs (see README.md).
PYTHON ?= python
# CI and fresh machines get the CPU wheel of torch; a user who already has torch keeps it.
TORCH_SPEC ?= torch==2.13.0
# The exact versions the suite and the README's figures were verified with (every package but torch, enecg_hf and
# momentfm, which are pinned here). `make install` (and so CI) installs them; `pip install enecg_hf` gets the ranges of
# setup.cfg; `make test-latest` tries the newest versions pip picks. CONSTRAINTS= installs without them.
CONSTRAINTS ?= .ci/constraints.txt
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c "$(CONSTRAINTS)")

.PHONY: install demo test test-fast test-latest test-min bench space model

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(PIP_CONSTRAINTS) "$(TORCH_SPEC)"
	$(PYTHON) -m pip install $(PIP_CONSTRAINTS) -e ".[dev,features,pretrained,moment,explain,demo]"
	# momentfm 0.1.4 pins transformers 4.33 but runs on 5.x: install it without its pins.
	$(PYTHON) -m pip install --no-deps momentfm==0.1.4

# The main job: train the tiny ensemble on simulated ECGs (CV + final fit, Hub-ready folder), then reload and predict.
demo: install
	$(PYTHON) train.py
	$(PYTHON) -m enecg_hf.tools.quickstart --model outputs/enecg-tiny-rr_interval

# The model shipped with the package (enecg_hf/pretrained/enecg-base): the public ECG databases in $(DATA_DIR) read,
# one multi-task EnECG trained on all of them with the default recipe (5-fold CV first), its Hub files copied in.
# Datasets, run and feature store in build/model; a second run reuses the store (see docs/training.md).
DATA_DIR ?= ../shared/data
model: install
	$(PYTHON) -m enecg_hf.tools.build_model --data-dir "$(DATA_DIR)"

test: install
	$(PYTHON) -m pytest -q

# The suite without the end-to-end runs marked `slow` (whole trainings, CLIs in subprocesses, the browser): for
# iterating; `make test` (CI) runs everything.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# The fast lane against the newest versions pip picks today (no constraints), in a brand-new venv (a few minutes to
# install): what a user who runs `pip install` gets. It lists the versions that differ from .ci/constraints.txt.
LATEST_VENV ?= build/venv-latest
test-latest:
	rm -rf "$(LATEST_VENV)"
	$(PYTHON) -m venv "$(LATEST_VENV)"
	$(MAKE) install PYTHON="$(abspath $(LATEST_VENV))/bin/python" CONSTRAINTS=
	"$(LATEST_VENV)/bin/python" -m pip freeze --exclude-editable --exclude torch --exclude momentfm \
		> "$(LATEST_VENV)/versions.txt"
	@echo "Versions that differ from .ci/constraints.txt (< pinned, > picked now):"
	@grep -v '^#' .ci/constraints.txt | diff - "$(LATEST_VENV)/versions.txt" | grep '^[<>]' || echo "  none"
	"$(LATEST_VENV)/bin/python" -m pytest -q -m "not slow"

# The lower bounds of setup.cfg, installed together (.ci/min-versions.txt) in a venv over the `make install`
# environment, then the tests of the model, PEFT routes, fitting, Trainer, data and docs (about 10 minutes).
MIN_VENV ?= build/venv-min
test-min: install
	$(PYTHON) -m venv --system-site-packages "$(MIN_VENV)"
	"$(MIN_VENV)/bin/python" -m pip install --quiet -r .ci/min-versions.txt
	PYTHONPATH="$(CURDIR)" "$(MIN_VENV)/bin/python" -m pytest -q -p no:cacheprovider tests/test_modeling_enecg.py \
		tests/test_fitting.py tests/test_trainer.py tests/test_docs.py tests/data \
		tests/test_training.py::test_saved_model_reproduces_its_saved_metrics

bench: install
	$(PYTHON) bench/data_build.py simulated
	$(PYTHON) bench/efficiency.py
	$(PYTHON) bench/quality.py

# A Hugging Face Space folder ready to upload (space/README.md): the app, its card and requirements, plus the enecg_hf
# package and momentfm (without its transformers 4.33 pin), installed into the folder: neither can come from the
# Space's requirements.txt (enecg_hf is not on PyPI; momentfm's pins conflict with transformers 5).
SPACE_DIR ?= build/space
space:
	rm -rf "$(SPACE_DIR)" && mkdir -p "$(SPACE_DIR)"
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation --target "$(SPACE_DIR)" . momentfm==0.1.4
	rm -rf "$(SPACE_DIR)/bin"
	cp space/app.py space/README.md space/requirements.txt "$(SPACE_DIR)/"
