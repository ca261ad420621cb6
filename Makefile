# flowmatch — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= outputs/demo
DEMO_ARGS ?=
export WANDB_MODE ?= offline

.PHONY: help install lint format demo test test-fast test-slow benchmark gpu-check dashboard clean \
        figures figures-fast figures-paper lemma1 prop1 fig4 fig5 fig6 prop2 table1 memorization \
        table2 table3 lemma2 fig-gradvar fig-stability

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install flowmatch with its dependencies

demo: install  ## 180° rotation, sigma in {0, 0.05}: train both (parallel), figures, gradvar + metrics in $(OUT) (DEMO_ARGS="k=v ..." adds overrides)
	rm -rf $(OUT)
	$(BIN)/python train.py --multirun experiment=rotation180 interpolant.sigma=0.0,0.05 callbacks=gradvar \
	  hydra/launcher=joblib_cpu threads=1 \
	  hydra.sweep.dir=$(OUT) hydra.sweep.subdir=sigma\$${interpolant.sigma} $(DEMO_ARGS)
	$(BIN)/python -m flowmatch.plots.rotation $(OUT)

lint: install  ## ruff: lint (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## ruff: fix what can be fixed and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint  ## lint, then the test suite, slow (multi-process, sweep) tests included
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

test-fast: install  ## the fast tests only
	$(BIN)/python -m pytest -q -n 2 -m "not slow" -p no:cacheprovider

test-slow: install  ## the slow tests only (DDP, sweeps)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

benchmark: install  ## CPU: Lightning-vs-bare-loop ratios, gradient-variance cost, global vs per-rank OT under DDP
	$(BIN)/python benchmarks/training_loop.py
	$(BIN)/python benchmarks/gradvar_cost.py
	$(BIN)/python benchmarks/global_ot_cost.py

gpu-check: install  ## GPU: unet_cifar on synthetic CIFAR-shaped tensors: train.py steps/s, Lightning vs bare loop, bf16, compile, probe cost (scripts/gpu_check.sh)
	PY=$(BIN)/python scripts/gpu_check.sh

# --- the paper (REPRODUCTION.md): `make <item>` sweeps into $(RUNS)/<item>, figures + CSV into $(FIGS)/<item> ---
# FAST=1: the same sweep at smoke size (make figures-fast, tests/test_paper.py). Extra overrides: ARGS="k=v ...".
RUNS    ?= outputs/paper
FIGS    ?= figures
FAST    ?=
ARGS    ?=
pick     = $(if $(FAST),$(2),$(1))
SWEEP   := --multirun hydra/launcher=joblib_cpu threads=1 hydra.sweep.subdir=\$${hydra.job.num}
TRAIN_SWEEP = $(BIN)/python train.py $(SWEEP) trainer.enable_progress_bar=false hydra.sweep.dir=$(RUNS)/$@
EVAL_SWEEP  = $(BIN)/python evaluate.py $(SWEEP) hydra.sweep.dir=$(RUNS)/$@
PLOT        = $(BIN)/python -m flowmatch.plots.$(subst -,_,$@) $(RUNS)/$@ $(FIGS)/$@
PAPER1  := lemma1 prop1 fig4 fig5 fig6 prop2 table1
PAPER2  := table2 table3 lemma2 fig-gradvar fig-stability
BEYOND  := memorization

LEMMA1_SWEEP := lemma1.dim=2,10,50
LEMMA1_FAST  := lemma1.dim=2 lemma1.widths=[8,32] lemma1.fit_steps=100 lemma1.n_samples=100 lemma1.n_test=200
PROP1_SWEEP  := field=ot,rot field.angle=0,30,60,90,120 'coupling.angle=$${field.angle}'
PROP1_FAST   := field=ot,rot field.angle=0,90 'coupling.angle=$${field.angle}' gradvar_field.n_per_bin=16
FIG4_SWEEP   := interpolant=cfm,bridge interpolant.sigma=0.05,0.1,0.5 field=ot,rot
FIG4_FAST    := interpolant=cfm interpolant.sigma=0.05 field=ot,rot gradvar_field.seeds=[0,1,2] gradvar_field.n_per_bin=16
FIG5_SWEEP   := gradvar_field.dim=2,5,10,20,50
FIG5_FAST    := gradvar_field.dim=2,5 gradvar_field.n_per_bin=16
# fig4, fig5: the sweep once under the overlay's rotated coupling, once under the independent one (no angle)
ROTATED      = coupling=rotated hydra.sweep.dir=$(RUNS)/$@/rotated
INDEPENDENT  = coupling=independent '~coupling.angle' hydra.sweep.dir=$(RUNS)/$@/independent
FIG6_SWEEP   := interpolant.sigma=0.0,0.01,0.05,0.1 coupling.n_pairs=50,1000 seed=0,1,2
FIG6_FAST    := interpolant.sigma=0.0,0.05 coupling.n_pairs=50 seed=0 debug=fast 'callbacks.eval_steps.steps=[10]' 'eval.euler_steps=[1,7,101]'
PROP2_SWEEP  := data.dim=2,3,50 interpolant.sigma=0.0,0.05
PROP2_FAST   := data.dim=2 interpolant.sigma=0.0,0.05 debug=fast
PROP2_FRESH_SWEEP := data.dim=2,3,50
PROP2_FRESH_FAST  := data.dim=2 debug=fast
TABLE1_SWEEP := data.dim=3,50 interpolant.sigma=0.0,0.05 seed=0,1,2
TABLE1_FAST  := data.dim=3 interpolant.sigma=0.0,0.05 seed=0,1 debug=fast
TABLE2_SWEEP := data.subset=300,1500 interpolant.sigma=0.0,0.05
TABLE2_FAST  := data.subset=40,80 interpolant.sigma=0.0,0.05 debug=fast
# table3: three stages (first flow -> its generated pairs -> the flows trained on them), each into a known dir
TABLE3_FLOW1_SWEEP :=
TABLE3_FLOW1_FAST  := debug=fast
TABLE3_PAIRS_SWEEP :=
TABLE3_PAIRS_FAST  := reflow.n_pairs=40
TABLE3_SWEEP := interpolant.sigma=0.0,0.05
TABLE3_FAST  := interpolant.sigma=0.0,0.05 debug=fast
# lemma2: train on the rotated coupling, then the ReFlow pairs of every trained flow (task=reflow_pairs)
LEMMA2_SWEEP := coupling.angle=90,180 interpolant.sigma=0.0,0.05
LEMMA2_FAST  := coupling.angle=90,180 interpolant.sigma=0.0,0.05 debug=fast
LEMMA2_PAIRS_SWEEP :=
LEMMA2_PAIRS_FAST  := reflow.n_pairs=200

# fig-gradvar, fig-stability at smoke size: both gradient-variance probes small and every 10 steps
PROBES_FAST  := callbacks.gradvar.every_n_steps=10 callbacks.gradvar_integrated.every_n_steps=10 \
  callbacks.gradvar.probe_size=40 callbacks.gradvar_integrated.probe_size=40 callbacks.gradvar_integrated.ode_steps=5
FIG_GRADVAR_SWEEP := direction=forward,backward interpolant.sigma=0.0,0.05 seed=0,1,2
FIG_GRADVAR_FAST  := direction=forward,backward interpolant.sigma=0.0,0.05 seed=0,1 debug=fast $(PROBES_FAST)
# fig-stability: train on the mixture and on digits, then evaluate.py task=stability on every last.ckpt
FIG_STABILITY_SWEEP  := direction=forward,backward seed=0,1,2
FIG_STABILITY_FAST   := direction=forward,backward seed=0 debug=fast $(PROBES_FAST)
FIG_STABILITY_DIGITS_SWEEP := direction=forward,backward seed=0,1
FIG_STABILITY_DIGITS_FAST  := direction=forward,backward seed=0 debug=fast $(PROBES_FAST)
FIG_STABILITY_EVAL_FAST    := stability.n_samples=8 stability.n_directions=2 'stability.times=[0.0,0.5]' \
  'stability.steps=[1,4]' 'stability.methods=[euler]' stability.ref_atol=1e-5 stability.ref_rtol=1e-5
CKPTS        = $$(ls $(RUNS)/$@/train/$(1)/*/checkpoints/last.ckpt | paste -sd, -)

# memorization (beyond the paper): the alarm of callbacks=memorization on seven families of runs, one seed each.
# Calibration family (the threshold was chosen on it alone, docs/memorization-calibration.md): prop2's Gaussian
# mixture, d = 2 and 50, sigma 0 / 0.05 and fresh sources, 4k steps. Evaluated without retuning: the 180-degree
# rotation (N 50 / 1000 x sigma 0 / 0.05), the rotated coupling with fresh draws and the independent coupling on the
# same data (cannot memorize), 10k steps; digits with fixed pairs (sigma 0 / 0.05) and shuffled OT, 1k steps.
# Step counts are cut from the experiments' own (prop2 20k, rotation 20k, digits 2k) to fit ~15 minutes on 2 cores;
# probes every 200 / 250 / 100 steps (10 to 40 probes a run; digits: Euler 1 and 7 only and 120-pair probes, the
# UNet's probe costing ~40 training steps). Gaussian runs evaluate with Euler 101 instead of dopri5.
MEM_CB      := callbacks=memorization
MEM_GAUSS   := solver=euler solver.steps=101
MEM_FAST    := debug=fast callbacks.memorization.every_n_steps=10 callbacks.memorization.probe_size=40 \
               'callbacks.memorization.euler_steps=[1,7]'
MEM_PROP2_SIZE  := trainer.max_steps=4000 callbacks.memorization.every_n_steps=200
MEM_ROT_SIZE    := trainer.max_steps=10000 callbacks.memorization.every_n_steps=250
MEM_DIGITS_SIZE := trainer.max_steps=1000 callbacks.memorization.every_n_steps=100 \
                   callbacks.memorization.probe_size=120 'callbacks.memorization.euler_steps=[1,7]'
MEM_PROP2_SWEEP   := data.dim=2,50 interpolant.sigma=0.0,0.05
MEM_PROP2_FAST    := data.dim=2 interpolant.sigma=0.0
MEM_FRESH_SWEEP   := data.dim=2,50
MEM_FRESH_FAST    := data.dim=2
MEM_ROT_SWEEP     := coupling.n_pairs=50,1000 interpolant.sigma=0.0,0.05
MEM_ROT_FAST      := coupling.n_pairs=50 interpolant.sigma=0.0
MEM_DIGITS_SWEEP  := interpolant.sigma=0.0,0.05
MEM_DIGITS_FAST   := interpolant.sigma=0.0
MEM_PROP2   = $(MEM_CB) $(MEM_GAUSS) $(call pick,$(MEM_PROP2_SIZE),$(MEM_FAST))
MEM_ROT     = $(MEM_CB) $(MEM_GAUSS) $(call pick,$(MEM_ROT_SIZE),$(MEM_FAST)) eval.keep_trajectories=[]
MEM_DIGITS  = 'callbacks=[images,memorization]' $(call pick,$(MEM_DIGITS_SIZE),$(MEM_FAST))
MEM_DIR      = hydra.sweep.dir=$(RUNS)/$@

figures: $(PAPER1) $(PAPER2) $(BEYOND)  ## every paper figure and table (items 1-12) and the memorization alarm

figures-fast: install  ## every paper target at smoke size, into outputs/figures-fast/
	$(MAKE) --no-print-directory $(PAPER1) $(PAPER2) $(BEYOND) FAST=1 RUNS=outputs/figures-fast/runs FIGS=outputs/figures-fast/figures

figures-paper: install  ## print the paper-scale plan: per item the command and the estimated GPU-hours
	$(BIN)/python scripts/paper_plan.py

lemma1: install  ## Lemma 1: dopri5 through the closed-form OT / rotated fields; MLP fit error vs width
	rm -rf $(RUNS)/$@
	$(EVAL_SWEEP) experiment=paper/lemma1 $(call pick,$(LEMMA1_SWEEP),$(LEMMA1_FAST)) $(ARGS)
	$(PLOT)

prop1: install  ## Prop. 1: zero loss/variance of pair-optimal fields at sigma=0; the OT field under rotations
	rm -rf $(RUNS)/$@
	$(EVAL_SWEEP) experiment=paper/prop1 $(call pick,$(PROP1_SWEEP),$(PROP1_FAST)) $(ARGS)
	$(PLOT)

fig4: install  ## Fig. 4: gradient variance at v_OT vs the rotated field with noise; one-sided tests
	rm -rf $(RUNS)/$@
	$(EVAL_SWEEP) experiment=paper/$@ $(call pick,$(FIG4_SWEEP),$(FIG4_FAST)) $(ROTATED) $(ARGS)
	$(EVAL_SWEEP) experiment=paper/$@ $(call pick,$(FIG4_SWEEP),$(FIG4_FAST)) $(INDEPENDENT) $(ARGS)
	$(PLOT)

fig5: install  ## Fig. 5: variance at v_OT, independent vs 120-degree coupling, against dimension
	rm -rf $(RUNS)/$@
	$(EVAL_SWEEP) experiment=paper/$@ $(call pick,$(FIG5_SWEEP),$(FIG5_FAST)) $(ROTATED) $(ARGS)
	$(EVAL_SWEEP) experiment=paper/$@ $(call pick,$(FIG5_SWEEP),$(FIG5_FAST)) $(INDEPENDENT) $(ARGS)
	$(PLOT)

fig6: install  ## Fig. 6: the 180-degree rotation: pair accuracy vs Euler steps, sigma, N, training length
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/fig6 $(call pick,$(FIG6_SWEEP),$(FIG6_FAST)) $(ARGS)
	$(PLOT)

prop2: install  ## Prop. 2: fixed random pairs to a Gaussian mixture: memorized at sigma=0, not with noise
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/prop2 $(call pick,$(PROP2_SWEEP),$(PROP2_FAST)) $(ARGS)
	$(TRAIN_SWEEP) experiment=paper/prop2 coupling.fresh_sources=true hydra.sweep.dir=$(RUNS)/$@/fresh_sources \
	  $(call pick,$(PROP2_FRESH_SWEEP),$(PROP2_FRESH_FAST)) $(ARGS)
	$(PLOT)

table1: install  ## Table 1: memorization / generalization MMD, Gaussian mixture d=3, 50, sigma 0 vs 0.05
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/table1 $(call pick,$(TABLE1_SWEEP),$(TABLE1_FAST)) $(ARGS)
	$(PLOT)

memorization: install  ## Beyond the paper: the memorization alarm on 7 families (calibrated on prop2 alone)
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/prop2 $(MEM_PROP2) $(call pick,$(MEM_PROP2_SWEEP),$(MEM_PROP2_FAST)) \
	  $(MEM_DIR)/prop2 $(ARGS)
	$(TRAIN_SWEEP) experiment=paper/prop2 $(MEM_PROP2) coupling.fresh_sources=true \
	  $(call pick,$(MEM_FRESH_SWEEP),$(MEM_FRESH_FAST)) $(MEM_DIR)/prop2_fresh_sources $(ARGS)
	$(TRAIN_SWEEP) experiment=rotation180 $(MEM_ROT) $(call pick,$(MEM_ROT_SWEEP),$(MEM_ROT_FAST)) \
	  $(MEM_DIR)/rotation180 $(ARGS)
	$(TRAIN_SWEEP) experiment=rotation180 $(MEM_ROT) coupling.n_pairs=null $(MEM_DIR)/rotated_fresh_draws $(ARGS)
	$(TRAIN_SWEEP) experiment=rotation180 $(MEM_ROT) coupling=independent '~coupling.angle' '~coupling.n_pairs' \
	  $(MEM_DIR)/independent $(ARGS)
	$(TRAIN_SWEEP) experiment=digits_memorization $(MEM_DIGITS) $(call pick,$(MEM_DIGITS_SWEEP),$(MEM_DIGITS_FAST)) \
	  $(MEM_DIR)/digits_fixed $(ARGS)
	$(TRAIN_SWEEP) experiment=digits_memorization $(MEM_DIGITS) coupling=shuffled_ot $(MEM_DIR)/digits_shuffled_ot $(ARGS)
	$(PLOT)

table2: install  ## Table 2: shuffled-OT pairs on digits (N 300, 1500), sigma 0 vs 0.05: L2 to OT / shuffled partner
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/table2 $(call pick,$(TABLE2_SWEEP),$(TABLE2_FAST)) $(ARGS)
	$(PLOT)

table3: install  ## Table 3: simulated 1-ReFlow on digits: L2 to the generated target / OT partner, sigma 0 vs 0.05
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/table3_flow1 hydra.sweep.dir=$(RUNS)/$@/flow1 \
	  $(call pick,$(TABLE3_FLOW1_SWEEP),$(TABLE3_FLOW1_FAST)) $(ARGS)
	$(EVAL_SWEEP) experiment=paper/table3_pairs hydra.sweep.dir=$(RUNS)/$@/pairs \
	  ckpt_path=$(RUNS)/$@/flow1/0/checkpoints/last.ckpt $(call pick,$(TABLE3_PAIRS_SWEEP),$(TABLE3_PAIRS_FAST))
	$(TRAIN_SWEEP) experiment=paper/table3 hydra.sweep.dir=$(RUNS)/$@/reflow \
	  coupling.pairs_path=$(RUNS)/$@/pairs/0/reflow_pairs.pt $(call pick,$(TABLE3_SWEEP),$(TABLE3_FAST)) $(ARGS)
	$(PLOT)

lemma2: install  ## Lemma 2: noiseless ReFlow keeps a 90-degree rotated coupling; 180 degrees and sigma 0.05 contrast
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/lemma2 hydra.sweep.dir=$(RUNS)/$@/train \
	  $(call pick,$(LEMMA2_SWEEP),$(LEMMA2_FAST)) $(ARGS)
	$(EVAL_SWEEP) experiment=paper/lemma2_pairs hydra.sweep.dir=$(RUNS)/$@/pairs \
	  ckpt_path=$$(ls $(RUNS)/$@/train/*/checkpoints/last.ckpt | paste -sd, -) \
	  $(call pick,$(LEMMA2_PAIRS_SWEEP),$(LEMMA2_PAIRS_FAST))
	$(PLOT)

fig-gradvar: install  ## Item 10: gradient variance per time bin, forward vs backward, sigma 0 vs 0.05, on digits
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/$@ $(call pick,$(FIG_GRADVAR_SWEEP),$(FIG_GRADVAR_FAST)) $(ARGS)
	$(PLOT)

fig-stability: install  ## Item 11: forward vs backward flows: endpoint error vs ODE steps, perturbation amplification
	rm -rf $(RUNS)/$@
	$(TRAIN_SWEEP) experiment=paper/$@ $(call pick,$(FIG_STABILITY_SWEEP),$(FIG_STABILITY_FAST)) \
	  hydra.sweep.dir=$(RUNS)/$@/train/gmm $(ARGS)
	$(TRAIN_SWEEP) experiment=paper/$@_digits $(call pick,$(FIG_STABILITY_DIGITS_SWEEP),$(FIG_STABILITY_DIGITS_FAST)) \
	  hydra.sweep.dir=$(RUNS)/$@/train/digits $(ARGS)
	$(EVAL_SWEEP) experiment=paper/$@_eval ckpt_path=$(call CKPTS,gmm) $(call pick,,$(FIG_STABILITY_EVAL_FAST)) \
	  hydra.sweep.dir=$(RUNS)/$@/stability/gmm
	$(EVAL_SWEEP) experiment=paper/$@_eval_digits ckpt_path=$(call CKPTS,digits) \
	  $(call pick,,$(FIG_STABILITY_EVAL_FAST)) hydra.sweep.dir=$(RUNS)/$@/stability/digits
	$(PLOT)

dashboard: install  ## wandb workspace of a gradient-variance sweep: ENTITY=... PROJECT=... [SWEEP=wandb group] (network)
	@test -n "$(ENTITY)" -a -n "$(PROJECT)" || { echo "error: make dashboard needs ENTITY=<wandb entity> \
	and PROJECT=<wandb project> (SWEEP=<group> optional), got ENTITY='$(ENTITY)' PROJECT='$(PROJECT)'" >&2; exit 2; }
	$(BIN)/python -m flowmatch.dashboard --entity "$(ENTITY)" --project "$(PROJECT)" $(if $(SWEEP),--sweep "$(SWEEP)")

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs multirun
