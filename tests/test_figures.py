"""Figures say what they show: σ and the step in the titles, labelled axes, one colour scale for compared
heatmaps, the OT targets where the demo claims movement toward OT. Small synthetic run dirs, Figure objects
inspected (nothing trained)."""

import csv
import json

import matplotlib
import numpy as np
import pytest
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection, QuadMesh  # noqa: E402

from flowmatch.plots import gradvar as gvplot  # noqa: E402
from flowmatch.plots import memorization_run, rotation  # noqa: E402

STEP, N, SCALE = 40, 12, {0.0: 1e-3, 0.05: 10.0}  # the two runs' variances differ by four decades


def _write_gradvar(path, scale: float) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "t_lo", "t_hi", "n", "loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"])
        for step in (0, 20, STEP):
            for k in range(4):
                var = scale * (1 + k) * (1 + step)
                w.writerow([step, k / 4, (k + 1) / 4, 10, 0.5 + k, var, 2 * var, 0.1])


def _run(root, sigma: float):
    """A run dir as train.py leaves it for the 180-degree rotation: config, metrics, trajectories, gradvar.csv."""
    run = root / f"sigma{sigma}"
    (run / ".hydra").mkdir(parents=True)
    cfg = {
        "interpolant": {"_target_": "flowmatch.interpolants.CFMInterpolant", "sigma": sigma},
        "data": {"mean": 5.0, "cov": 1.0, "dim": 2},
        "direction": {"name": "forward"},
        "solver": {"method": "dopri5"},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"train/global_step": float(STEP), "eval/pair_acc": 0.5}
    for k in (1, 7):
        metrics.update({f"eval/{m}@euler{k}": 0.5 for m in ("pair_acc", "l2_partner", "l2_ot")})
    (run / "metrics.json").write_text(json.dumps(metrics))
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    traj = torch.stack([x0 + t * (5 - 2 * x0) for t in torch.linspace(0, 1, 8)])
    torch.save({"x0": x0, "x1": 5 - x0, "euler7": traj, "solver": traj}, run / "eval_trajectories.pt")
    _write_gradvar(run / "gradvar.csv", SCALE[sigma])
    return run


@pytest.fixture
def runs(tmp_path):
    for sigma in SCALE:
        _run(tmp_path, sigma)
    return rotation._runs(tmp_path)


def _plot_axes(fig):
    """The drawing axes of ``fig`` (colourbars and switched-off panels left out)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def _check_titles_and_labels(fig) -> None:
    suptitle = fig._suptitle.get_text() if fig._suptitle else ""
    for ax in _plot_axes(fig):
        text = ax.get_title() + " " + suptitle + " " + " ".join(t.get_text() for t in _legend_texts(ax))
        assert "σ" in text and "step" in text, text
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def _legend_texts(ax):
    legend = ax.get_legend()
    return legend.get_texts() if legend else []


def test_trajectories_name_sigma_and_step_and_draw_the_ot_targets(runs):
    fig = rotation.trajectories_figure(runs)
    _check_titles_and_labels(fig)
    for (cfg, _), _run_dir in runs:
        assert f"σ={cfg['interpolant']['sigma']:g}, step {STEP}" in " ".join(ax.get_title() for ax in fig.axes)
    x0 = torch.load(runs[0][1] / "eval_trajectories.pt")["x0"].numpy()
    panels = _plot_axes(fig)
    assert len(panels) == 2 * 3  # pairs, euler7, solver per sigma
    for ax in panels:
        ot = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label().startswith("OT target")]
        assert len(ot) == 1, ax.get_title()
        # N(0, I) -> N(5, I): the OT map is the translation by 5 (not the rotation x1 = 5 - x0 of the pairs)
        np.testing.assert_allclose(ot[0].get_offsets(), x0 + 5, atol=1e-5)
    plt.close(fig)


def test_pair_accuracy_and_profiles_titles(runs):
    for fig in (
        rotation.pair_accuracy_figure(runs),
        gvplot.profiles_figure([gvplot.read_gradvar(r / "gradvar.csv") for _, r in runs], ["σ=0", "σ=0.05"]),
    ):
        _check_titles_and_labels(fig)
        plt.close(fig)


def test_compared_heatmaps_share_one_colour_scale(runs):
    datas = [gvplot.read_gradvar(r / "gradvar.csv") for _, r in runs]
    fig = gvplot.heatmaps_figure(datas, ["σ=0", "σ=0.05"], title="after 40 steps")
    _check_titles_and_labels(fig)
    meshes = [c for ax in _plot_axes(fig) for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 2
    everything = np.concatenate([d["grad_var"] for d in datas])
    for mesh in meshes:
        np.testing.assert_allclose(mesh.get_clim(), (everything.min(), everything.max()))
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    plt.close(fig)


def test_one_run_heatmap_and_profile(runs):
    d = gvplot.read_gradvar(runs[1][1] / "gradvar.csv")
    for fig in (gvplot.heatmap_figure(d, "σ=0.05"), gvplot.profile_figure(d, "σ=0.05")):
        _check_titles_and_labels(fig)
        plt.close(fig)
    # without a caption the run dir's config names sigma
    heat, _ = gvplot.plot_gradvar(runs[1][1] / "gradvar.csv", runs[1][1])
    assert heat.exists()


def test_demo_figure_script_writes_its_files(runs, tmp_path):
    rotation.main([str(tmp_path)])
    for name in ("trajectories", "pair_acc", "gradvar", "gradvar_heatmaps"):
        assert (tmp_path / f"rotation_{name}.png").stat().st_size > 0


def test_memorization_figure_names_sigma_and_steps():
    rows = []
    for step in (0, 100, 200):
        row = {"step": step, "loss_gap": 0.1, "var_gap": 0.2, "signal_stat": "grad_var", "threshold": 1.0}
        row.update({"alarm": int(step == 200), "pair_acc@euler1": 0.5, "holdout_pair_acc@euler1": 0.1})
        for b in range(2):
            row.update({f"bin{b:02d}_t_lo": b / 2, f"bin{b:02d}_t_hi": (b + 1) / 2})
            row.update({f"bin{b:02d}_{s}_{w}": 1.0 + b for s in ("loss", "var") for w in ("train", "holdout")})
        rows.append(row)
    fig = memorization_run.run_figure(rows, "memorization probe", "σ=0")
    _check_titles_and_labels(fig)
    assert "steps 0–200" in fig._suptitle.get_text()
    plt.close(fig)
