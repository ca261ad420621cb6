"""The wandb dashboard spec (flowmatch/dashboard.py) builds offline, and every key its panels read is one a
gradvar + memorization run really logs to wandb (so a renamed metric breaks this test, not the dashboard)."""

import json

import pytest
from helpers import run_entry
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from wandb_offline import offline_runs, summarize

from flowmatch import dashboard, keys
from flowmatch.dashboard import GROUP_BY, STEP, build_workspace


def panel_keys(workspace) -> dict[str, set]:
    """The keys the panels read, by kind: line series (and their x axis), bar charts (summary), images."""
    out = {"line": set(), "x": set(), "bar": set(), "media": set()}
    for section in workspace.sections:
        for panel in section.panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                out["line"] |= {getattr(k, "name", k) for k in panel.y}
                out["x"].add(getattr(panel.x, "name", panel.x))
            elif kind == "BarPlot":
                out["bar"] |= {getattr(k, "name", k) for k in panel.metrics}
            elif kind == "MediaBrowser":
                out["media"] |= set(panel.media_keys)
    return out


def test_workspace_builds_offline():
    ws = build_workspace("an-entity", "a-project", sweep="sweeps/gv", bins=4, euler_steps=[1, 7])
    model = ws._to_model()  # the payload save() would send, built without a network
    assert "gradvar/bin_03/var" in model.model_dump_json()
    names = [s.name for s in ws.sections]
    assert names[0] == "gradient variance per time bin" and "memorization" in names
    assert len(ws.sections[0].panels) == len(ws.sections[1].panels) == 4  # one panel per bin
    assert ws.runset_settings.filters == "Metric(\"Group\") == 'sweeps/gv'"  # the sweep's runs only
    assert [g.name for g in ws.runset_settings.groupby] == [dashboard.config_key(p) for p in GROUP_BY]
    k = panel_keys(ws)
    assert {keys.gradvar_key(b, "var") for b in range(4)} | {keys.gradvar_key(b, "loss") for b in range(4)} <= k["line"]
    assert {keys.metric("mem/pair_acc", 7), keys.metric("mem/holdout_pair_acc", 1)} <= k["line"]
    assert k["media"] == set(keys.MEDIA) and k["x"] == {STEP}
    assert build_workspace("e", "p").runset_settings.filters == ""  # no SWEEP: every run of the project


def test_group_by_paths_exist_in_the_config():
    with initialize_config_dir(config_dir=str(dashboard.CONF), version_base="1.3"):
        cfg = compose("train")
    for path in GROUP_BY:
        assert OmegaConf.select(cfg, path) is not None, path


@pytest.mark.slow
def test_panel_keys_are_logged_by_a_gradvar_memorization_run(tmp_path):
    run_entry(
        "train.py",
        "debug=fast",
        "logger=wandb",
        "coupling=fixed",
        "coupling.n_pairs=64",
        "interpolant=cfm",
        "callbacks=[gradvar,memorization]",
        "callbacks.gradvar.every_n_steps=10",
        "callbacks.gradvar.probe_size=40",
        "callbacks.memorization.every_n_steps=10",
        "callbacks.memorization.probe_size=40",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_home")},
    )
    (folder,) = offline_runs(tmp_path)
    run = summarize(folder)
    k = panel_keys(build_workspace("e", "p"))  # the defaults: bins and Euler steps of conf/callbacks/
    assert k["line"] | k["x"] <= run["history_keys"], sorted((k["line"] | k["x"]) - run["history_keys"])
    for key in k["media"]:
        assert list((folder / "files" / "media" / "images").glob(f"{key}_*.png")), key
    for key in k["bar"]:  # a Gaussian run has every eval key but the image-only ones
        assert key in run["summary"] or keys.METRICS[key].startswith("images:"), key
    config = json.loads(run["config"]["config"])
    for path in GROUP_BY:
        node = config
        for part in path.split("."):
            node = node[part]
        assert node is not None, path
