# The two commands that matter: `make run` (set up, then serve) and `make test` (set up, then test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that the development machine uses; on a GPU host: make TORCH_SPEC='torch' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
MODELS_DIR ?= checkpoints
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: venv run test test-avx2 lint docs bench bench-load masks default-model best-model fast-model real-model encoder-compare rrdb-model rlfb-model rrdb-real-model ablations arch-ablations clean system-deps image image-test

# Serving needs torch and the package's own dependencies; training, tests, lint and docs add the extras.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Serves every checkpoint in MODELS_DIR (checkpoints/: default, real, fast) by its directory's name; installs only
# what serving needs (`make venv` or `make test` add the training and development extras).
run: $(SERVE_STAMP)
	$(BIN)/samdiffsr serve --models-dir $(MODELS_DIR) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .

# System tools some tests run: for the deploy checks (tests/test_deploy_*.py) promtool and prometheus (Debian
# `prometheus`) and docker-compose (validates the compose files, no Docker engine needed); for the page test
# (tests/test_service_page.py) a headless browser, Debian's `chromium` and `chromium-driver`. Installed only when
# missing, and only as root where apt-get exists; otherwise those tests say what is missing.
system-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 \
	    && command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose chromium chromium-driver >/dev/null; \
	else echo "system-deps: missing tools; install Debian's prometheus, docker-compose, chromium and chromium-driver" >&2; fi

# The documentation site (MkDocs, docs/ -> build/site/): the generated reference pages must match the code, and
# any warning (a broken link, a page missing from the navigation) fails the build.
docs: $(STAMP)
	$(BIN)/python -m samdiffsr.docgen --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory docs
	$(BIN)/python -m pytest -q

# The tests as a CPU without AVX-512 or bf16 runs them, on any x86 machine: torch's kernels and oneDNN held to
# AVX2, so `auto` precision resolves to fp32 (what an AVX2-only AMD EPYC does; its speed is not imitated).
test-avx2: $(STAMP) system-deps
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/model_bench.py

# Load benchmark of the HTTP service (continuous batching on/off); a few minutes on 2 CPU cores.
# Options go in ARGS, e.g. make bench-load ARGS=--quick
bench-load: $(STAMP)
	$(BIN)/python bench/load_bench.py $(ARGS)

# The shipped models (docs/model-card.md) stand on pretrained networks whose published weights are in PRETRAINED
# (loaded strictly, checked by sha256). fast-model: RLFN alone. best-model: RFDN + RLFN fused by least squares
# with the refiner trained over them (configs/refine.yaml), then the pair distilled three times towards its own
# four flips averaged (configs/distill-pair.yaml, distill-pair-2.yaml, distill-pair-3.yaml). default-model: `best`
# with RLFN narrowed to 32 channels (samdiffsr narrow), distilled towards `best`'s four flips with RFDN held fixed
# (configs/distill-narrow.yaml, distill-narrow-2.yaml). real-model: the published pair and a refiner
# tuned on the real degradation, in five stages (configs/refine-real.yaml, then refine-real-2 to -5, each from the
# last one's checkpoint, for the steps the shipped model had). The trainings are campaigns: SIGTERM checkpoints, the same command
# resumes exactly;
# `samdiffsr repack RUN/checkpoint checkpoints/ID --dtype fp32 --extra default_steps=N --extra default_tile=256
# --card configs/cards/ID.json` ships a run (the served defaults and card measured as the model card says).
CORPUS ?= ../shared/data/corpus-hr
RUNS ?= runs
PRETRAINED ?= ../shared/pretrained
masks: $(STAMP)
	$(BIN)/samdiffsr masks generate $(CORPUS)/train $(RUNS)/masks/train-json --backend felzenszwalb --no-progress
	$(BIN)/samdiffsr masks embed $(CORPUS)/train $(RUNS)/masks/train-json $(RUNS)/masks/train-spe --no-progress

fast-model: $(STAMP)
	$(BIN)/samdiffsr import-pretrained rlfn $(RUNS)/fast-rlfn --weights $(PRETRAINED)
	$(BIN)/samdiffsr repack $(RUNS)/fast-rlfn checkpoints/fast --dtype fp32 --extra default_steps=0 \
	  --extra default_tile=256 --card configs/cards/fast.json --name samdiffsr-fast

best-model: masks
	$(BIN)/samdiffsr train diffusion --config configs/refine.yaml --out $(RUNS)/refine-default --steps 3093 \
	  --spe-dir $(RUNS)/masks/train-spe --set diffusion.pretrained_dir=$(PRETRAINED)
	$(BIN)/samdiffsr train rrdb --config configs/distill-pair.yaml --out $(RUNS)/distill-default --steps 1250 \
	  --set run.init=$(RUNS)/refine-default/checkpoint --set data.teacher.checkpoint=$(RUNS)/refine-default/checkpoint
	$(BIN)/samdiffsr train rrdb --config configs/distill-pair-2.yaml --out $(RUNS)/distill-default-2 --steps 1000 \
	  --set run.init=$(RUNS)/distill-default/checkpoint --set data.teacher.checkpoint=$(RUNS)/distill-default/checkpoint
	$(BIN)/samdiffsr train rrdb --config configs/distill-pair-3.yaml --out $(RUNS)/distill-default-3 --steps 1000 \
	  --set run.init=$(RUNS)/distill-default-2/checkpoint --set data.teacher.checkpoint=$(RUNS)/distill-default-2/checkpoint

default-model: $(STAMP)
	$(BIN)/samdiffsr narrow checkpoints/best $(RUNS)/narrow-default --width 32
	$(BIN)/samdiffsr train rrdb --config configs/distill-narrow.yaml --out $(RUNS)/distill-narrow --steps 750 \
	  --set run.init=$(RUNS)/narrow-default
	$(BIN)/samdiffsr train rrdb --config configs/distill-narrow-2.yaml --out $(RUNS)/distill-narrow-2 --steps 500 \
	  --set run.init=$(RUNS)/distill-narrow/checkpoint

real-model: masks
	$(BIN)/samdiffsr train diffusion --config configs/refine-real.yaml --out $(RUNS)/refine-real --steps 2035 \
	  --spe-dir $(RUNS)/masks/train-spe --set diffusion.pretrained_dir=$(PRETRAINED)
	$(BIN)/samdiffsr train diffusion --config configs/refine-real-2.yaml --out $(RUNS)/refine-real-2 --steps 3956 \
	  --spe-dir $(RUNS)/masks/train-spe --set run.init=$(RUNS)/refine-real/checkpoint
	$(BIN)/samdiffsr train diffusion --config configs/refine-real-3.yaml --out $(RUNS)/refine-real-3 --steps 4500 \
	  --spe-dir $(RUNS)/masks/train-spe --set run.init=$(RUNS)/refine-real-2/checkpoint
	$(BIN)/samdiffsr train diffusion --config configs/refine-real-4.yaml --out $(RUNS)/refine-real-4 --steps 3000 \
	  --spe-dir $(RUNS)/masks/train-spe --set run.init=$(RUNS)/refine-real-3/checkpoint
	$(BIN)/samdiffsr train diffusion --config configs/refine-real-5.yaml --out $(RUNS)/refine-real-5 --steps 1250 \
	  --spe-dir $(RUNS)/masks/train-spe --set run.init=$(RUNS)/refine-real-4/checkpoint

# The equal-budget comparison of the pretrained encoders under the refiner (docs/model-card.md).
encoder-compare: masks
	PATH=$(BIN):$$PATH bash bench/encoder_compare.sh 15 $(RUNS)/compare

# The first generation's recipes (docs/research-notes.md), no longer shipped: the RRDB model from scratch (stage 1,
# then stage 2 with structure modulation), its real-world fine-tune, and the RLFB model.
TRAIN_CONFIG ?= configs/default.yaml
RRDB_STEPS ?= 6000
DIFFUSION_STEPS ?= 200000
RRDB_SETTINGS := --set data.hr_patch=128 --set optim.decay_every=2000 --set optim.decay_start=0 --set optim.ema=0 --set run.threads=1
STAGE2 := $(BIN)/samdiffsr train diffusion --config $(TRAIN_CONFIG) --rrdb $(RUNS)/default-rrdb/checkpoint \
	--spe-dir $(RUNS)/masks/train-spe
rrdb-model: masks
	$(BIN)/samdiffsr train rrdb --config $(TRAIN_CONFIG) --out $(RUNS)/default-rrdb $(RRDB_SETTINGS) --steps $(RRDB_STEPS)
	$(STAGE2) --out $(RUNS)/default-diffusion --steps $(DIFFUSION_STEPS)

# The first generation's efficient model (configs/fast.yaml): RLFB encoder and LR-space denoiser trained together.
rlfb-model: masks
	$(BIN)/samdiffsr train diffusion --config configs/fast.yaml --out $(RUNS)/fast --spe-dir $(RUNS)/masks/train-spe

# The first generation's architecture ablation at equal budget (docs/research-notes.md): four arms (RRDB or RLFB encoder x HR- or
# LR-space denoiser), 16 minutes on one core each, two at a time, then the same evaluation of each.
arch-ablations: masks
	PATH=$(BIN):$$PATH bash bench/ablation.sh $(RUNS)/ablation

# The first generation's real-world model (configs/real.yaml): the RRDB model (rrdb-model) fine-tuned on patches
# degraded by the `real` pipeline.
rrdb-real-model: masks
	$(BIN)/samdiffsr train diffusion --config configs/real.yaml --out $(RUNS)/real \
	  --rrdb $(RUNS)/default-diffusion/checkpoint --spe-dir $(RUNS)/masks/train-spe \
	  --set run.init=$(RUNS)/default-diffusion/checkpoint

# The first generation's ablations at equal budget (docs/research-notes.md): stage 2 from the same stage-1 encoder for ABLATION_STEPS steps,
# one run per prediction target x residual base, and the shipped setting without structure modulation; then
# each is evaluated on centre crops of the validation photos.
ABLATION_STEPS ?= 800
ABLATIONS ?= epsilon-bicubic v-bicubic sample-bicubic sample-rrdb
ablations: masks
	for a in $(ABLATIONS); do \
	  $(STAGE2) --out $(RUNS)/ablation-$$a --steps $(ABLATION_STEPS) --set run.threads=1 \
	    --set model.overrides.prediction=$${a%-*} --set model.overrides.residual_base=$${a#*-} || exit 1; \
	done
	$(STAGE2) --out $(RUNS)/ablation-nostructure --steps $(ABLATION_STEPS) --set run.threads=1 --no-structure
	for a in $(ABLATIONS) nostructure; do \
	  $(BIN)/samdiffsr eval $(RUNS)/ablation-$$a/checkpoint $(CORPUS)/val --steps 0,1,2,4 --tile 64 --hr-crop 384 \
	    --out $(RUNS)/ablation-$$a/eval || exit 1; \
	done

# The container image's CPU variant (deploy/image.sh): `docker build` where a Docker engine answers, else
# buildah on a locally debootstrapped Debian base with this machine's torch wheel. image-test (not part of
# `make test`: minutes of downloads) builds it, serves from it and checks /readyz, an upscale, /metrics and
# the HEALTHCHECK. Settings such as IMAGE, ENGINE, PORT, PHOTO: see deploy/image.sh.
image:
	deploy/image.sh build

image-test:
	deploy/image.sh test

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
