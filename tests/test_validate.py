"""Bad input gets one ``error:`` line naming the key, the value and what is allowed, exit status 2, before any work
and without a run directory: property-based (hypothesis) through ``preflight`` in process, the function train.py
runs before Hydra, plus real subprocesses for the paths that only a process shows."""

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from helpers import run_entry
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from flowmatch.entry import build, instantiate_all, user_errors
from flowmatch.preflight import CONF_DIR, preflight

HAS_GPU = torch.cuda.is_available()
BASE = ["callbacks=[gradvar,memorization]", "interpolant=cfm", "solver=euler"]
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]  # no explain phase: it traces every line
SETTINGS = settings(max_examples=20, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _leaves(node, prefix=""):
    for key in node:
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            yield from _leaves(node[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value._value() if not OmegaConf.is_interpolation(node, key) else None


_CFG = _compose(BASE)
NUMERIC_KEYS = sorted(
    k
    for k, v in _leaves(_CFG)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith(("hydra", "logger"))
)
ALL_KEYS = sorted(k for k, _ in _leaves(_CFG) if not k.startswith(("hydra", "logger")) and not k.endswith("_target_"))
# Lower bounds a user can read in the docs and yaml comments (independent of flowmatch.validate's tables).
AT_LEAST = {
    "trainer.max_steps": 1,
    "trainer.log_every_n_steps": 1,
    "data.dim": 1,
    "data.batch_size": 1,
    "data.val_size": 1,
    "solver.steps": 1,
    "eval.n_fresh": 2,
    "coupling.n_holdout": 0,
    "model.width": 1,
    "model.depth": 1,
    "seed": 0,
    "checkpoint.every_n_train_steps": 1,
    "callbacks.gradvar.every_n_steps": 1,
    "callbacks.memorization.patience": 1,
}
POSITIVE = {  # key -> the group choices that have it
    "optimizer.lr": [],
    "solver.atol": ["solver=dopri5"],
    "solver.rtol": ["solver=dopri5"],
    "coupling.rel_gap": ["coupling=shuffled_ot"],
    "data.std": ["data=gmm"],
}
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8).filter(
    lambda w: w not in ("auto", "nan", "inf", "null", "true", "false", "none")
)


def run_preflight(overrides, tmp="/tmp/flowmatch-validate-run"):
    """(exit status or None, error lines, other stderr) of preflight('train', overrides)."""
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err):
        try:
            preflight("train", [*overrides, f"hydra.run.dir={tmp}"])
        except SystemExit as exc:
            code = exc.code
    lines = err.getvalue().splitlines()
    return code, [ln for ln in lines if ln.startswith("error:")], [ln for ln in lines if not ln.startswith("error:")]


def assert_one_clean_error(overrides, *words):
    code, errors, other = run_preflight(overrides)
    assert code == 2, (overrides, errors)
    assert len(errors) == 1 and not other, (errors, other)
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


@SETTINGS
@given(key=st.sampled_from(NUMERIC_KEYS), word=WORDS)
def test_wrong_type_names_key_and_value(key, word):
    assert_one_clean_error([*BASE, f"{key}={word}"], key, word)


@SETTINGS
@given(key=st.sampled_from(sorted(AT_LEAST)), below=st.integers(1, 10**6))
def test_below_range_names_key_value_and_bound(key, below):
    value = AT_LEAST[key] - below
    line = assert_one_clean_error([*BASE, f"{key}={value}"], key, str(value))
    assert f">= {AT_LEAST[key]}" in line or "must be" in line


@SETTINGS
@given(key=st.sampled_from(sorted(POSITIVE)), value=st.one_of(st.floats(-1e6, 0.0), st.just(0)))
def test_non_positive_names_key(key, value):
    assert_one_clean_error([*BASE, *POSITIVE[key], f"{key}={value}"], key, "> 0")


@SETTINGS
@given(group=st.sampled_from(["data", "trainer", "interpolant", "coupling", "eval", "callbacks.gradvar"]), name=WORDS)
def test_unknown_key_names_it_and_the_known_ones(group, name):
    node = OmegaConf.select(_CFG, group)
    if name in node:
        return
    assert_one_clean_error([*BASE, f"{group}.{name}=1"], f"{group}.{name}", "unknown config key")


@SETTINGS
@given(group=st.sampled_from(["data", "model", "interpolant", "coupling", "solver", "optimizer", "logger"]), name=WORDS)
def test_unknown_option_names_group_and_options(group, name):
    if (Path(CONF_DIR) / group / f"{name}.yaml").exists():
        return
    options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    assert_one_clean_error([f"{group}={name}"], group, name, options[0])


VALUES = st.one_of(
    st.integers(-3, 64),
    st.floats(-2.0, 70.0, allow_nan=False),
    WORDS,
    st.sampled_from(["null", "true", "false", "[]", "[1,7]", "[0.5,0.2]", "nan", "inf", "-inf"]),
)


@settings(max_examples=40, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(ALL_KEYS), value=VALUES)
def test_any_override_is_either_rejected_cleanly_or_builds(key, value):
    """Whatever a key is set to, preflight rejects it with one line (exit 2) or the components build; a value
    that passes preflight but fails in a constructor must still give one line (user_errors), never a traceback."""
    overrides = [*BASE, f"{key}={value}"]
    code, errors, other = run_preflight(overrides)
    if code is not None:
        assert code == 2 and len(errors) == 1 and not other, (overrides, errors, other)
        return
    cfg = _compose(overrides)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit), user_errors():
        build(cfg)
        from hydra.utils import instantiate

        instantiate(cfg.eval)
        instantiate_all(cfg.callbacks, "callbacks")
    lines = err.getvalue().splitlines()
    assert len(lines) <= 1 and all(ln.startswith("error:") for ln in lines), (overrides, lines)


def test_every_overlay_and_group_option_passes(tmp_path):
    """No false alarms: the default configs, every group option and every train overlay validate cleanly."""
    options = [
        f"{group}={p.stem}"
        for group in ("data", "model", "interpolant", "coupling", "solver", "optimizer", "scheduler", "trainer")
        for p in sorted((Path(CONF_DIR) / group).glob("*.yaml"))
        if not (group == "coupling" and p.stem == "reflow") and not (group == "data" and p.stem == "image_folder")
    ]
    overlays = [
        "experiment=" + str(p.relative_to(Path(CONF_DIR) / "experiment").with_suffix(""))
        for p in sorted((Path(CONF_DIR) / "experiment").rglob("*.yaml"))
        if "# entry: evaluate.py" not in p.read_text() and "pairs_path" not in p.read_text()
    ]
    for override in [*options, *overlays]:
        if "interpolant=linear" in override:
            continue
        code, errors, _ = run_preflight([override, "logger=csv"], tmp=str(tmp_path / "run"))
        assert code is None or (not HAS_GPU and len(errors) == 1 and "no CUDA GPU" in errors[0]), (override, errors)
    assert not (tmp_path / "run").exists()


def test_every_evaluate_overlay_passes(tmp_path):
    """The `# entry: evaluate.py` overlays validate for evaluate.py (those of a checkpoint task ask for ckpt_path,
    which their Makefile sweep gives)."""
    for p in sorted((Path(CONF_DIR) / "experiment").rglob("*.yaml")):
        if "# entry: evaluate.py" not in p.read_text():
            continue
        overlay = "experiment=" + str(p.relative_to(Path(CONF_DIR) / "experiment").with_suffix(""))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            preflight("evaluate", [overlay, f"hydra.run.dir={tmp_path / 'run'}"])
        errors = err.getvalue().splitlines()
        assert not errors or (len(errors) == 1 and "ckpt_path is required" in errors[0]), (overlay, errors)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'", "integer >= 1"]),
        (["interpolant=cfm", "interpolant.sigma=abc"], ["interpolant.sigma", "'abc'", ">= 0"]),
        (["eval.euler_steps=[0,7]"], ["eval.euler_steps", "[0, 7]", "integers >= 1"]),
        (["eval.keep_trajectories=[5]"], ["eval.keep_trajectories=[5]", "eval.euler_steps"]),
        (["coupling=reflow"], ["coupling.pairs_path", "task=reflow_pairs"]),
        (["coupling=reflow", "coupling.pairs_path=nope.pt"], ["coupling.pairs_path='nope.pt'", "task=reflow_pairs"]),
        (["callbacks=gradvar", "callbacks.gradvar.probe_size=405"], ["probe_size=405", "multiple of the 10 bins"]),
        (["callbacks=memorization", "callbacks.memorization.bins=3"], ["probe_size=250", "multiple of the 3 bins"]),
        (["model.width=1.5"], ["model.width", "1.5", "integer >= 1"]),
        (["interpolant.sigma=0.1"], ["interpolant.sigma", "0.1", "interpolant=linear"]),
    ],
)
def test_bad_input_examples(overrides, words):
    assert_one_clean_error(overrides, *words)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'", "integer >= 1"]),
        (["coupling=reflow"], ["coupling.pairs_path", "task=reflow_pairs"]),
        (["data.cov=[[1,2],[3,4]]"], ["data.cov", "symmetric"]),  # found by a constructor, after Hydra started
    ],
)
def test_bad_input_subprocess_no_traceback_no_run_dir(overrides, words, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry("train.py", *overrides, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not run_dir.exists()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_gpu_trainer_without_gpu():
    assert_one_clean_error(["trainer=gpu"], "trainer.accelerator=gpu", "no CUDA GPU", "trainer=cpu")


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, errors, other = run_preflight([], tmp=str(blocker / "run"))
    assert code == 2 and len(errors) == 1 and not other
    assert "hydra.run.dir" in errors[0] and "is a file" in errors[0] and str(blocker) in errors[0]
    code, errors, _ = run_preflight(["-m"], tmp=str(blocker / "run"))  # a multirun writes under hydra.sweep.dir
    assert code is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, errors, _ = run_preflight([], tmp=str(ro / "run"))
    assert code == 2 and "not writable" in errors[0]


def test_wandb_without_key_or_offline_mode_says_how_to_choose(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert_one_clean_error(["logger=wandb"], "logger=wandb", "WANDB_MODE=offline", "wandb login")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_preflight(["logger=wandb"])[0] is None
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert run_preflight(["logger=wandb"])[0] is None


@pytest.mark.parametrize("mean", [[], [1.0, 2.0, 3.0], [[1.0, 2.0]], float("nan"), "abc"])
def test_gaussian_mean_of_the_wrong_shape_is_one_clear_error(mean):
    """Found by the property test above: ``data.mean=[]`` passed every check and crashed in ``setup()``."""
    from flowmatch.couplings import IndependentCoupling
    from flowmatch.data.gaussian import GaussianDataModule

    with pytest.raises(ValueError, match=r"data.mean must be a finite number or a list of data.dim=2 numbers"):
        GaussianDataModule(IndependentCoupling(), dim=2, mean=mean)
    assert GaussianDataModule(IndependentCoupling(), dim=2, mean=[1, 2]).mean.tolist() == [1.0, 2.0]
