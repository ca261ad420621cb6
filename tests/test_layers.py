"""The layering of docs/DESIGN.md: the math core imports no Lightning/Hydra/wandb and not the closed-form
analysis (a leaf); the Lightning layer no Hydra."""

import subprocess
import sys

CORE = [
    "flowmatch.gaussian",
    "flowmatch.keys",
    "flowmatch.streams",
    "flowmatch.interpolants",
    "flowmatch.couplings",
    "flowmatch.global_ot",
    "flowmatch.losses",
    "flowmatch.sampling",
    "flowmatch.stability",
    "flowmatch.metrics",
    "flowmatch.eval_setup",
    "flowmatch.evaluation",
    "flowmatch.gradvar",
    "flowmatch.gradvar_stats",
    "flowmatch.gradvar_microbatch",
    "flowmatch.persample",
    "flowmatch.persample_hooks",
    "flowmatch.persample_layers",
    "flowmatch.binreduce",
    "flowmatch.binreduce_linear",
    "flowmatch.binreduce_passes",
    "flowmatch.gradvar_plan",
    "flowmatch.gradvar_memory",
    "flowmatch.gradvar_accumulate",
    "flowmatch.distributions",
    "flowmatch.direction",
    "flowmatch.models.mlp",
    "flowmatch.models.unet",
    "flowmatch.models.gaussian_affine",
    "flowmatch.image_metrics",
    "flowmatch.memorization",
    "flowmatch.diagnose",
    "flowmatch.finite",
    "flowmatch.checkpoints",
    "flowmatch.preconditions",
    "flowmatch.config_rules",
    "flowmatch.terminal",
]
ANALYSIS = [
    "flowmatch.analysis",
    "flowmatch.analysis.lemma1",
    "flowmatch.analysis.oracle",
    "flowmatch.analysis.field_table",
    "flowmatch.analysis.stats",
    "flowmatch.analysis.verdicts",
]
LIGHTNING = [
    "flowmatch.module",
    "flowmatch.data",
    "flowmatch.callbacks.gradvar",
    "flowmatch.callbacks.ema",
    "flowmatch.callbacks.samples",
    "flowmatch.callbacks.memorization",
    "flowmatch.callbacks.media",
    "flowmatch.callbacks.progress",
]

# Imports the modules one after another in a fresh interpreter and names the first that pulls in a
# forbidden package (earlier modules are clean, so the first offender is the culprit).
SCRIPT = """
import importlib, sys
forbidden = set(sys.argv[1].split(','))
for name in sys.argv[2:]:
    importlib.import_module(name)
    bad = sorted(forbidden & {m.split('.')[0] for m in sys.modules})
    if bad:
        print(f'{name} imports {bad}')
        sys.exit(1)
"""


def check(modules, forbidden):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(forbidden), *modules], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_core_imports_no_framework():
    check(CORE + ANALYSIS, ["lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb"])


def test_core_does_not_import_the_analysis_leaf():
    """Importing every core module (and the Lightning layer) never pulls in flowmatch.analysis."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import importlib, sys\n"
                f"for name in {CORE + LIGHTNING!r}:\n"
                "    importlib.import_module(name)\n"
                "    bad = sorted(m for m in sys.modules if m.startswith('flowmatch.analysis'))\n"
                "    if bad:\n"
                "        print(f'{name} imports {bad}')\n"
                "        sys.exit(1)\n"
            ),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_lightning_layer_imports_no_hydra():
    check(LIGHTNING, ["hydra", "omegaconf"])
