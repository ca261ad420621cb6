"""The wandb workspace of a gradient-variance sweep: ``make dashboard ENTITY=... PROJECT=... [SWEEP=...]``.

:func:`build_workspace` returns a ``wandb_workspaces`` Workspace (nothing is sent); ``python -m flowmatch.dashboard``
saves it to wandb and prints its URL. Runs are grouped by σ (``interpolant.sigma``) and direction
(``direction.name``), so every line is the mean over the seeds of one (σ, direction) cell with its min-max band;
``SWEEP`` keeps the runs of one sweep (its wandb group, ``flowmatch/wandb_run.py``). Sections:

- gradient variance per time bin: ``gradvar/bin_XX/var`` against the training step, one panel per bin, log scale;
- loss per time bin: ``gradvar/bin_XX/loss`` likewise;
- heatmaps: the ``gradvar/heatmap`` image of every run (t bin x step);
- evaluation: one bar chart per ``eval/`` key (the runs' summary values); the runs table pins the same keys;
- memorization (``callbacks=memorization``): the alarm signal and both gaps, the alarm, pair accuracy of training
  and held-out sources per Euler step count, the held-out / train ratios per bin, the ``mem/figure`` image.

Every key comes from :mod:`flowmatch.keys` (the callbacks' own names). The number of bins and the memorization
probe's Euler step counts default to ``conf/callbacks/{gradvar,memorization}.yaml``. Outside the math core:
it imports ``wandb_workspaces`` (a dependency in pyproject.toml), which imports wandb, and only here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from flowmatch.keys import gradvar_key, media_key, mem_key, metric

CONF = Path(__file__).resolve().parent.parent / "conf"
STEP = "trainer/global_step"  # Lightning's WandbLogger logs every metric against this step key
GROUP_BY = ("interpolant.sigma", "direction.name")  # config paths; train.py logs the config under "config"
EVAL_KEYS = (
    "eval/pair_acc",
    "eval/l2_partner",
    "eval/l2_ot",
    "eval/mmd_mem",
    "eval/mmd_gen",
    "eval/w2",
    "eval/nfe",
    "eval/mem_rate",
    "eval/fid",
    "eval/kid",
)
MEM_SCALARS = ("mem/signal", "mem/var_gap", "mem/loss_gap", "mem/alarm")


def callback_default(name: str, key: str):
    """A callback setting's default from ``conf/callbacks/<name>.yaml``."""
    return yaml.safe_load((CONF / "callbacks" / f"{name}.yaml").read_text())[name][key]


def n_bins(bins) -> int:
    """The number of time bins of a ``bins`` setting: K equal bins, or a list of K + 1 edges."""
    return len(bins) - 1 if isinstance(bins, (list, tuple)) else int(bins)


def config_key(path: str) -> str:
    """wandb's backend name of a config value: train.py logs the resolved config as one nested value ``config``,
    stored as ``config.value.<path>``."""
    return f"config.value.{path}"


def _line(wr, title: str, keys: list[str], log_y: bool = False):
    """A line plot of `keys` against the training step."""
    return wr.LinePlot(title=title, x=STEP, y=keys, log_y=log_y or None)


def gradvar_sections(wr, ws, bins: int) -> list:
    """Per-bin gradient variance and per-bin loss against the step, and the heatmap images."""
    var = [_line(wr, f"grad variance, bin {k:02d}", [gradvar_key(k, "var")], log_y=True) for k in range(bins)]
    loss = [_line(wr, f"loss, bin {k:02d}", [gradvar_key(k, "loss")], log_y=True) for k in range(bins)]
    heat = [wr.MediaBrowser(title="gradient variance: t bin x step", media_keys=[media_key("gradvar/heatmap")])]
    return [
        ws.Section(name="gradient variance per time bin", panels=var, is_open=True),
        ws.Section(name="loss per time bin", panels=loss),
        ws.Section(name="gradient variance heatmaps", panels=heat),
    ]


def eval_section(wr, ws) -> list:
    """One bar chart per eval/ key (summary values of the runs, grouped like the workspace)."""
    bars = [wr.BarPlot(title=key, metrics=[metric(key)]) for key in EVAL_KEYS]
    return [ws.Section(name="evaluation (end of training)", panels=bars)]


def memorization_sections(wr, ws, bins: int, euler_steps: list[int]) -> list:
    """The memorization alarm: signal, gaps and alarm; pair accuracy; per-bin held-out / train ratios; figure."""
    panels = [_line(wr, key, [metric(key)]) for key in MEM_SCALARS]
    for k in euler_steps:
        keys = [metric("mem/pair_acc", k), metric("mem/holdout_pair_acc", k)]
        panels.append(_line(wr, f"pair accuracy, Euler {k}: training vs held-out", keys))
    for stat in ("var_ratio", "loss_ratio"):
        keys = [mem_key(b, stat) for b in range(bins)]
        panels.append(_line(wr, f"held-out / train {stat.split('_')[0]} per bin", keys, log_y=True))
    panels.append(wr.MediaBrowser(title="memorization", media_keys=[media_key("mem/figure")]))
    return [ws.Section(name="memorization", panels=panels)]


def build_workspace(entity: str, project: str, sweep: str | None = None, bins=None, mem_bins=None, euler_steps=None):
    """The Workspace object of the module docstring (not saved). ``bins``, ``mem_bins``: the gradient-variance and
    memorization callbacks' ``bins`` settings; ``euler_steps``: the memorization callback's (defaults: conf/)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    bins = n_bins(callback_default("gradvar", "bins") if bins is None else bins)
    mem_bins = n_bins(callback_default("memorization", "bins") if mem_bins is None else mem_bins)
    euler_steps = list(callback_default("memorization", "euler_steps") if euler_steps is None else euler_steps)
    runset = ws.RunsetSettings(
        filters=[ws.Metric("Group") == sweep] if sweep else "",
        groupby=[ws.Config(config_key(path)) for path in GROUP_BY],
        pinned_columns=[f"summary:{metric(key)}" for key in EVAL_KEYS],
    )
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"flowmatch gradient variance: {sweep}" if sweep else "flowmatch gradient variance",
        settings=ws.WorkspaceSettings(x_axis=STEP),
        runset_settings=runset,
        sections=gradvar_sections(wr, ws, bins)
        + eval_section(wr, ws)
        + memorization_sections(wr, ws, mem_bins, euler_steps),
    )


def main(argv: list[str] | None = None) -> None:
    """Build the workspace for ENTITY/PROJECT [SWEEP] and save it to wandb (needs a network and a login)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--sweep", default=None, help="the sweep's wandb group (default: every run of the project)")
    parser.add_argument("--bins", type=int, default=None, help="time bins of callbacks.gradvar (default: conf/)")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.sweep, bins=args.bins)
    workspace.save()
    print(f"flowmatch: dashboard saved: {workspace.url}")


if __name__ == "__main__":
    main()
