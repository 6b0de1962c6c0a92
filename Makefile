# One place for the set-up and the two quick-start jobs (see README.md).
PYTHON ?= python
# CI and fresh machines get the CPU wheel of torch; a user who already has torch keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev,features,serve,pretrained]"
	# momentfm 0.1.4 pins transformers 4.33 but runs on 5.x: install it without its pins.
	$(PYTHON) -m pip install --no-deps momentfm==0.1.4

# The main job: train the tiny ensemble on simulated ECGs (CV + final fit, Hub-ready folder), then reload and predict.
demo: install
	$(PYTHON) train.py
	$(PYTHON) -m enecg_hf.quickstart --model outputs/enecg-tiny-rr_interval

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/build_dataset.py
	$(PYTHON) bench/efficiency.py
	$(PYTHON) bench/quality.py
