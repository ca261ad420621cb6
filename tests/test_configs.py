"""Every option of every config group composes and instantiates (no training), so a broken YAML file under
conf/ fails here, named by its test id (``data=gmm``, ``hydra/launcher=joblib_cpu``, ...).

Groups and options are discovered from the folders under conf/ at collection time (a folder holding
``*.yaml`` files is a group, ``hydra/launcher`` included); a new option is covered without editing this
file, and ``test_every_yaml_file_is_covered`` fails when a file under conf/ is reached by no test.

Each (group, option) is composed with the primary config whose defaults list names the group (train.yaml
first, then evaluate.yaml; ``hydra/...`` groups: train with Hydra's own config) and the node(s) the option
contributes are instantiated the way train.py / evaluate.py / flowmatch.entry.build do, plus a cheap use
(a forward pass, a solver run, an optimizer step, a coupling sample). ``# @package _global_`` overlays
(experiment, debug) instantiate the whole run of train.py without ``trainer.fit``. Data sets that need
files (cifar10, celeba) are instantiated but never ``setup()`` (their files are loaded in setup).

Hardware: on a machine without CUDA a trainer option asking for a GPU is instantiated with
``accelerator=cpu, devices=1`` (and ``strategy=auto`` for GPU-only strategies such as fsdp, whose name is then
checked against Lightning's strategy registry); with CUDA it is instantiated as written.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

CONF = Path(__file__).resolve().parent.parent / "conf"
PRIMARIES = sorted((p.stem for p in CONF.glob("*.yaml")), key=lambda s: (s != "train", s))  # train first

# Data modules whose setup() needs no files and is cheap (the others load their files in setup()).
OFFLINE_DATA = {
    "flowmatch.data.GaussianDataModule",
    "flowmatch.data.DigitsDataModule",
    "flowmatch.data.RandomImageDataModule",
    "flowmatch.data.ImageFolderDataModule",
}
# Lightning strategies that refuse a CPU accelerator.
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def _mandatory_reflow(tmp_path: Path) -> list[str]:
    path = tmp_path / "reflow_pairs.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"x0": torch.randn(16, 2, generator=g), "x1": torch.randn(16, 2, generator=g)}, path)
    return [f"coupling.pairs_path={path}"]


def _mandatory_reflow_digits(tmp_path: Path) -> list[str]:
    path = tmp_path / "reflow_pairs_digits.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"x0": torch.randn(16, 1, 8, 8, generator=g), "x1": torch.rand(16, 1, 8, 8, generator=g) * 2 - 1}, path)
    return [f"coupling.pairs_path={path}"]


def _mandatory_image_folder(tmp_path: Path) -> list[str]:
    from helpers import write_pngs

    write_pngs(tmp_path / "images", n=4)
    return [f"data.root={tmp_path / 'images'}"]


# Options with mandatory values (`???`): the extra overrides (and files) a test gives them.
MANDATORY = {
    ("data", "image_folder"): _mandatory_image_folder,
    ("coupling", "reflow"): _mandatory_reflow,
    ("experiment", "paper/table3"): _mandatory_reflow_digits,
    ("experiment", "paper/table3_paper"): _mandatory_reflow,  # CelebA: instantiated only, the file is not read
}


# --- discovery ------------------------------------------------------------------------------------------
# Groups whose subfolders hold more options of the group (``experiment=paper/fig4``), not groups of their own.
NESTED_OPTIONS = ("experiment",)


def _groups() -> dict[str, list[str]]:
    """{group: sorted options}: every folder under conf/ that holds .yaml files directly (the files of a
    subfolder of a NESTED_OPTIONS group are options ``sub/name`` of that group)."""
    out = {}
    for d in sorted(p for p in CONF.rglob("*") if p.is_dir()):
        rel = d.relative_to(CONF).as_posix()
        group = next((g for g in NESTED_OPTIONS if rel.startswith(g + "/")), rel)
        prefix = rel[len(group) + 1 :] + "/" if group != rel else ""
        options = [prefix + f.stem for f in d.glob("*.yaml") if f.is_file()]
        if options:
            out[group] = sorted(out.get(group, []) + options)
    return out


def _defaults_groups(primary: str) -> list[str]:
    """The groups named in a primary config's defaults list."""
    defaults = (yaml.safe_load((CONF / f"{primary}.yaml").read_text()) or {}).get("defaults") or []
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            for key in entry:
                key = key.replace("override ", "").replace("optional ", "").strip().lstrip("/")
                groups.append(key.split("@")[0])
    return groups


GROUPS = _groups()
DEFAULTS = {p: _defaults_groups(p) for p in PRIMARIES}


def _primary_for(group: str) -> tuple[str, bool]:
    """(primary config to compose, whether the group is in its defaults list)."""
    for p in PRIMARIES:
        if group in DEFAULTS[p]:
            return p, True
    return "train", group.startswith("hydra/")  # hydra/launcher etc.: Hydra's own defaults list


def _is_global(group: str, option: str) -> bool:
    head = (CONF / group / f"{option}.yaml").read_text().splitlines()[:5]
    return any(line.replace(" ", "") == "#@package_global_" for line in head)


def _entry(group: str, option: str) -> str | None:
    """The primary config an overlay is written for, from a header line ``# entry: evaluate.py`` (else None)."""
    for line in (CONF / group / f"{option}.yaml").read_text().splitlines()[:5]:
        if line.startswith("# entry:"):
            return Path(line.split(":", 1)[1].strip()).stem
    return None


CASES = [pytest.param(group, option, id=f"{group}={option}") for group, opts in GROUPS.items() for option in opts]
# Groups that a second primary config (evaluate.yaml) also lists: compose them there too.
SHARED = [
    pytest.param(p, group, option, id=f"{p}:{group}={option}")
    for p in PRIMARIES[1:]
    for group in DEFAULTS[p]
    if _primary_for(group)[0] != p
    for option in GROUPS.get(group, [])
]


# --- composing ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def composed(primary: str, overrides: list[str], run_dir: Path):
    """Yield ``(cfg, hydra_node)``: the config as the entry point's job sees it (``${hydra:...}`` resolves: the
    HydraConfig is set, output dir ``run_dir``; no ``hydra`` key; no ``???`` left; every interpolation resolves)
    and Hydra's own node apart (launcher checks)."""
    previous = HydraConfig.instance().cfg
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        try:
            hydra_node = OmegaConf.masked_copy(cfg, "hydra").hydra
            with open_dict(cfg):
                del cfg["hydra"]
            missing = sorted(OmegaConf.missing_keys(cfg))
            assert not missing, f"mandatory values (???) without a test value: {missing}; add them to MANDATORY"
            check_hydra_keys(cfg, hydra_node)
            OmegaConf.to_container(cfg, resolve=True)  # train.py stores the whole resolved config
            yield cfg, hydra_node
        finally:
            HydraConfig.instance().cfg = previous


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def check_hydra_keys(cfg: DictConfig, hydra_node: DictConfig) -> None:
    """``${hydra:KEY}`` names an existing key (Hydra's resolver turns a misspelt one into None silently)."""
    missing = object()
    for text in _strings(OmegaConf.to_container(cfg, resolve=False)):
        for key in re.findall(r"\$\{hydra:([^}]+)\}", text):
            assert OmegaConf.select(hydra_node, key.strip(), default=missing) is not missing, (
                f"${{hydra:{key}}} in {text!r}: no such key in Hydra's config"
            )


def _overrides(group: str, option: str, tmp_path: Path, in_defaults: bool) -> list[str]:
    out = [f"{group}={option}" if in_defaults else f"+{group}={option}"]
    if (group, option) in MANDATORY:
        out += MANDATORY[(group, option)](tmp_path)
    return out


# --- building blocks ------------------------------------------------------------------------------------
def make_trainer(node: DictConfig, run_dir: Path, **kwargs) -> L.Trainer:
    overrides = {}
    if not torch.cuda.is_available() and str(node.get("accelerator")) in ("gpu", "cuda"):
        overrides = {"accelerator": "cpu", "devices": 1}  # no GPU here: the rest of the node still checked
        strategy = node.get("strategy")
        if isinstance(strategy, str) and strategy.startswith(GPU_ONLY_STRATEGIES):
            from lightning.pytorch.strategies import StrategyRegistry

            assert strategy in StrategyRegistry.available_strategies(), f"unknown strategy {strategy!r}"
            overrides["strategy"] = "auto"
    trainer = instantiate(node, default_root_dir=str(run_dir), **{**kwargs, **overrides})
    assert isinstance(trainer, L.Trainer)
    return trainer


def make_datamodule(cfg: DictConfig, setup: bool = True):
    from flowmatch.data import FlowDataModule

    dm = instantiate(cfg.data, coupling=instantiate(cfg.coupling))
    assert isinstance(dm, FlowDataModule)
    offline = cfg.data._target_ in OFFLINE_DATA
    if setup and offline:
        dm.setup()
        x0, x1 = dm.coupling.sample(4, torch.Generator().manual_seed(0))
        assert x0.shape == x1.shape and x0[0].numel() == cfg.data.dim
        assert torch.isfinite(x0).all() and torch.isfinite(x1).all()
    return dm, offline


def input_shape(cfg: DictConfig, batch: int = 2) -> tuple[int, ...]:
    data = cfg.data
    if "channels" in data and "image_size" in data:
        return (batch, data.channels, data.image_size, data.image_size)
    return (batch, data.dim)


def check_model(model: torch.nn.Module, shape) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        v = model(x, torch.rand(shape[0]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def make_module(cfg: DictConfig, model=None):
    from flowmatch.module import FlowMatchingModule

    model = instantiate(cfg.model) if model is None else model
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return FlowMatchingModule(
        model, instantiate(cfg.interpolant), instantiate(cfg.optimizer), scheduler, **cfg.get("module", {})
    )


def instantiate_run(cfg: DictConfig, run_dir: Path) -> None:
    """train.py up to (not including) ``trainer.fit``; flowmatch.entry.build when the data need no files."""
    from flowmatch.entry import build

    if cfg.data._target_ in OFFLINE_DATA:
        datamodule, module, solver = build(cfg)
        x0, x1 = datamodule.coupling.sample(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert module(x0, torch.rand(2)).shape == x0.shape
    else:  # files needed: instantiate only (their data are loaded in setup())
        datamodule, _ = make_datamodule(cfg, setup=False)
        module, _ = make_module(cfg), instantiate(cfg.solver)
    instantiate(cfg.eval)
    module.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if datamodule.p0 is not None:
        for cb in callbacks:
            if hasattr(cb, "validate"):
                cb.validate(datamodule=datamodule, module=module)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    make_trainer(cfg.trainer, run_dir, logger=loggers or False, callbacks=callbacks)


# --- per-group checks -----------------------------------------------------------------------------------
def check_data(cfg, tmp_path):
    dm, offline = make_datamodule(cfg)
    if offline:
        x0, x1 = next(iter(dm.val_dataloader()))
        assert x0.shape == x1.shape and x0.shape[0] >= 1


def check_model_group(cfg, tmp_path):
    check_model(instantiate(cfg.model), input_shape(cfg))


def check_interpolant(cfg, tmp_path):
    interp = instantiate(cfg.interpolant)
    x0, x1, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    path = interp(x0, x1, t)
    assert path.x_t.shape == path.u_t.shape == x0.shape
    assert torch.isfinite(path.x_t).all() and torch.isfinite(path.u_t).all()


def check_coupling(cfg, tmp_path):
    dm, offline = make_datamodule(cfg)  # the default data (gaussian): set up, pairs sampled
    assert offline and dm.coupling.p0 is not None


def check_direction(cfg, tmp_path):
    from flowmatch.direction import DIRECTIONS

    assert cfg.direction.name in DIRECTIONS
    make_datamodule(cfg)


def check_solver(cfg, tmp_path):
    solver = instantiate(cfg.solver)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    x1 = solver.integrate(lambda x, t: -x, x0).x1
    torch.testing.assert_close(x1, x0 * math.exp(-1), rtol=1e-2, atol=1e-3)


def check_optimization(cfg, tmp_path):
    """optimizer / scheduler (both _partial_): FlowMatchingModule.configure_optimizers and one step."""
    module = make_module(cfg)
    out = module.configure_optimizers()
    opt = out["optimizer"] if isinstance(out, dict) else out
    assert isinstance(opt, torch.optim.Optimizer)
    x = torch.randn(4, cfg.data.dim)
    module(x, torch.rand(4)).pow(2).mean().backward()
    opt.step()
    if isinstance(out, dict):
        sched = out["lr_scheduler"]["scheduler"]
        assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
        sched.step()


def check_trainer(cfg, tmp_path):
    make_trainer(cfg.trainer, tmp_path, logger=False, callbacks=[])


def check_logger(cfg, tmp_path):
    from lightning.pytorch.loggers import Logger

    for name, node in cfg.logger.items():
        assert isinstance(instantiate(node), Logger), name


def check_callbacks(cfg, tmp_path):
    from flowmatch.entry import build

    datamodule, module, _ = build(cfg)  # the default run (gaussian data) for the callbacks' validate()
    for name, node in cfg.callbacks.items():
        cb = instantiate(node)
        assert isinstance(cb, L.Callback), name
        if hasattr(cb, "validate"):
            cb.validate(datamodule=datamodule, module=module)


def check_field(cfg, tmp_path):
    """evaluate.py task=gradvar_field with this field, at a tiny size."""
    from flowmatch.analysis.field_table import field_gradvar_rows

    g = {**OmegaConf.to_container(cfg.gradvar_field, resolve=True), "bins": 2, "n_per_bin": 4, "seeds": [0]}
    rows = field_gradvar_rows(
        field=cfg.field.name,
        angle=float(cfg.field.angle),
        coupling=instantiate(cfg.coupling),
        interpolant=instantiate(cfg.interpolant),
        **g,
    )
    assert rows and all(math.isfinite(r["loss"]) for r in rows)


def check_generic(cfg, tmp_path, group):
    """Any other group: instantiate its node (a ``_target_`` node, or a dict of them), else resolve it."""
    node = OmegaConf.select(cfg, group.replace("/", "."))
    if isinstance(node, DictConfig) and "_target_" in node:
        instantiate(node)
    elif (
        isinstance(node, DictConfig)
        and len(node)
        and all(isinstance(v, DictConfig) and "_target_" in v for v in node.values())
    ):
        for v in node.values():
            instantiate(v)
    elif isinstance(node, DictConfig):
        OmegaConf.to_container(node, resolve=True)


CHECKS = {
    "data": check_data,
    "interpolant": check_interpolant,
    "coupling": check_coupling,
    "direction": check_direction,
    "solver": check_solver,
    "optimizer": check_optimization,
    "scheduler": check_optimization,
    "trainer": check_trainer,
    "logger": check_logger,
    "callbacks": check_callbacks,
    "field": check_field,
}


# --- tests ----------------------------------------------------------------------------------------------
def check_analysis(cfg, tmp_path):
    """An evaluate.py overlay (``# entry: evaluate.py``): a known task; task=gradvar_field runs tiny."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate", CONF.parent / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    assert cfg.task in evaluate.TASKS, cfg.task
    if cfg.task == "gradvar_field":
        check_field(cfg, tmp_path)


def check_logging_config(config: dict, tmp_path) -> None:
    """A logging option is a valid ``logging.config.dictConfig`` (its log file put in ``tmp_path``) whose handlers
    write what they are given."""
    import logging
    import logging.config

    for handler in config.get("handlers", {}).values():
        if "filename" in handler:
            handler["filename"] = str(tmp_path / "job.log")
    saved = logging.getLogger().handlers[:]
    try:
        logging.config.dictConfig(config)
        logging.getLogger("flowmatch").info("hello from the test")
        for h in logging.getLogger().handlers:
            h.flush()
    finally:
        for h in logging.getLogger().handlers:
            if h not in saved:
                h.close()
        logging.getLogger().handlers[:] = saved
    if any("filename" in h for h in config.get("handlers", {}).values()):
        assert "hello from the test" in (tmp_path / "job.log").read_text()


@pytest.mark.parametrize("group,option", CASES)
def test_option(group, option, tmp_path):
    primary, in_defaults = _primary_for(group)
    if _entry(group, option):
        primary, in_defaults = _entry(group, option), True
    overrides = _overrides(group, option, tmp_path, in_defaults)
    if group in ("hydra/job_logging", "hydra/hydra_logging"):
        with composed(primary, overrides, tmp_path) as (_, hydra_node):
            node = OmegaConf.select(hydra_node, group.split("/", 1)[1])
            check_logging_config(OmegaConf.to_container(node, resolve=False), tmp_path)
        return
    if group.startswith("hydra/"):
        with composed(primary, overrides, tmp_path) as (_, hydra_node):
            node = OmegaConf.select(hydra_node, group.split("/", 1)[1].replace("/", "."))
            assert isinstance(node, DictConfig) and "_target_" in node
            OmegaConf.to_container(node, resolve=True)
            target = node._target_
            try:
                assert isinstance(get_class(target), type)
            except ValueError:  # a function target
                get_method(target)
        return
    if group == "model":
        check_model_with_some_data(primary, option, tmp_path)
        return
    with composed(primary, overrides, tmp_path) as (cfg, _):
        if _is_global(group, option) and primary == "evaluate":
            check_analysis(cfg, tmp_path)
        elif _is_global(group, option):
            instantiate_run(cfg, tmp_path)
        elif group in CHECKS:
            CHECKS[group](cfg, tmp_path)
        else:
            check_generic(cfg, tmp_path, group)


def check_model_with_some_data(primary, option, tmp_path):
    """A model is checked with the default data, or the first data option it works with (a UNet needs image
    data: ``data.channels``, ``data.image_size``); the error of every data option is shown when none works."""
    offline = _offline_data_options()
    candidates = [None] + sorted(GROUPS.get("data", []), key=lambda d: d not in offline)  # default data first
    errors = []
    for data in candidates:
        overrides = [f"model={option}"] + ([f"data={data}"] if data else [])
        try:
            with composed(primary, overrides, tmp_path) as (cfg, _):
                check_model_group(cfg, tmp_path)
            return
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"data={data or 'default'}: {type(exc).__name__}: {exc}")
    pytest.fail(f"model={option} works with no data option:\n" + "\n".join(errors))


def _offline_data_options() -> list[str]:
    out = []
    for d in GROUPS.get("data", []):
        node = yaml.safe_load((CONF / "data" / f"{d}.yaml").read_text()) or {}
        if node.get("_target_") in OFFLINE_DATA:
            out.append(d)
    return out


def _second_primary_param(p):
    """An option overriding groups the primary's defaults list lacks cannot compose there: a strict xfail
    (evaluate.yaml lists `experiment`, but the experiments override /data, /model, ... which it lacks)."""
    primary, group, option = p.values
    lacking = sorted(set(_defaults_groups_of_option(group, option)) - set(DEFAULTS[primary]))
    if not lacking:
        return p
    reason = f"{group}/{option}.yaml overrides {lacking}, absent from {primary}.yaml's defaults list"
    return pytest.param(*p.values, id=p.id, marks=pytest.mark.xfail(strict=True, reason=reason))


def _defaults_groups_of_option(group: str, option: str) -> list[str]:
    """The groups an option's defaults list overrides, following included configs (``- /experiment/x``)."""
    node = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    out = []
    for entry in (node.get("defaults") or []) if isinstance(node, dict) else []:
        if isinstance(entry, str) and entry.startswith("/") and entry != "/_self_":
            included_group, _, included = entry.lstrip("/").partition("/")
            out += _defaults_groups_of_option(included_group, included)
        if isinstance(entry, dict):
            for key in entry:
                if key.startswith("override /"):
                    out.append(key[len("override /") :].split("@")[0].strip())
    return out


@pytest.mark.parametrize("primary,group,option", [_second_primary_param(p) for p in SHARED])
def test_option_in_second_primary(primary, group, option, tmp_path):
    """Groups a second primary config (evaluate.yaml) lists compose there too, and their node instantiates."""
    with composed(primary, _overrides(group, option, tmp_path, True), tmp_path) as (cfg, _):
        node = OmegaConf.select(cfg, group.replace("/", "."))
        if isinstance(node, DictConfig) and "_target_" in node:
            instantiate(node)


@pytest.mark.parametrize("primary", PRIMARIES)
def test_primary_defaults(primary, tmp_path):
    """Each primary config composes with its defaults; train's default run instantiates whole."""
    with composed(primary, [], tmp_path) as (cfg, _):
        if primary == "train":
            instantiate_run(cfg, tmp_path)
        else:
            for group in DEFAULTS[primary]:
                node = OmegaConf.select(cfg, group.replace("/", "."))
                if isinstance(node, DictConfig) and "_target_" in node:
                    instantiate(node)


def test_offline_data_targets_exist():
    """OFFLINE_DATA names real classes (a renamed module would silently turn off the setup() checks)."""
    for target in OFFLINE_DATA:
        assert isinstance(get_class(target), type), target


def test_every_yaml_file_is_covered():
    """Every config file under conf/ is reached by a test above (an option added to a folder is never skipped;
    a .yml file or a stray file Hydra would not load shows up here)."""
    reached = {CONF / f"{p}.yaml" for p in PRIMARIES}
    reached |= {CONF / group / f"{option}.yaml" for group, option in (c.values for c in CASES)}
    on_disk = {p for p in CONF.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml")}
    assert on_disk - reached == set(), f"config files no test reaches: {sorted(map(str, on_disk - reached))}"
    assert reached <= on_disk
    assert {"data", "model", "trainer"} <= set(GROUPS)  # discovery found the groups at all


def test_callback_settings_without_the_callback_stop_with_one_clear_error(capsys):
    """An overlay's settings for a callback absent from the chosen list (callbacks=[ema,throughput] over an overlay
    that tunes `samples`) stop with one line naming the key, its settings and the chosen callbacks."""
    from flowmatch.entry import instantiate_all

    group = OmegaConf.create(
        {"throughput": {"_target_": "flowmatch.callbacks.throughput.Throughput"}, "samples": {"every_n_steps": 5}}
    )
    with pytest.raises(SystemExit) as exc:
        instantiate_all(group, "callbacks")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "callbacks.samples" in err and "every_n_steps" in err and "throughput" in err
