"""The README's quickstart and "use your own data" commands, run as written (at smoke size: the Makefile's
``DEMO_ARGS`` / extra overrides appended), and the files the README promises."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT, write_pngs

README = (ROOT / "README.md").read_text()
DEMO_SMOKE = (
    "trainer.max_steps=20 trainer.val_check_interval=10 callbacks.gradvar.every_n_steps=10 "
    "callbacks.gradvar.probe_size=40"
)
IMAGE_SMOKE = ["trainer.max_steps=3", "data.image_size=8", "data.dim=192", "eval.n_fresh=16", "eval.euler_steps=[1]"]


def section(title: str) -> str:
    """The README text under the ``## title`` heading, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    """The fenced ``lang`` code blocks of ``text``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def run(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def python_command(command: str, **subst: str) -> list[str]:
    """A README ``python train.py ...`` command as argv, with this interpreter and ``subst`` applied (placeholder
    -> value) to every word; leading ``VAR=value`` words are returned as environment in :func:`split_env`."""
    for key, value in subst.items():
        command = command.replace(key, value)
    return shlex.split(command)


def split_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while argv and re.match(r"^[A-Z_]+=", argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    assert argv[:2] == ["python", "train.py"], argv
    return env, [sys.executable, *argv[1:]]


def test_quickstart_is_make_demo_and_make_test():
    assert commands(blocks(section("Quickstart"), "bash")[0]) == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in [line.strip() for line in ci]  # what CI runs is the README's command


@pytest.mark.slow
def test_make_demo_writes_the_files_the_readme_lists(tmp_path):
    out = tmp_path / "demo"
    run(
        [
            "make",
            "-o",
            "install",
            "demo",
            f"OUT={out}",
            f"DEMO_ARGS={DEMO_SMOKE}",
            f"BIN={os.path.dirname(sys.executable)}",
        ]
    )
    text = section("Quickstart")
    promised = re.findall(r"`([\w./]+\.(?:png|json|csv))`", text)
    assert "rotation_trajectories.png" in promised and "sigma0.05/metrics.json" in promised
    for name in promised:
        if "/" in name or name.startswith("rotation_"):
            assert (out / name).is_file(), name
    for run_dir in ("sigma0.0", "sigma0.05"):
        for name in ("gradvar.csv", "gradvar_heatmap.png"):  # each run's files, named in the same list
            assert name in promised and (out / run_dir / name).is_file()


@pytest.mark.slow
def test_image_folder_command_as_written(tmp_path):
    (command,) = commands(blocks(section("Use your own data"), "bash")[0])
    write_pngs(tmp_path / "images" / "class_a", n=4)
    write_pngs(tmp_path / "images" / "class_b", n=4, seed=1)
    env, argv = split_env(python_command(command, **{"path/to/images": str(tmp_path / "images")}))
    run([*argv, *IMAGE_SMOKE, f"hydra.run.dir={tmp_path / 'run'}", "threads=1"], env)
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.slow
def test_custom_datamodule_as_written(tmp_path):
    text = section("Use your own data")
    (code,), (config,) = blocks(text, "python"), blocks(text, "yaml")
    (tmp_path / "mydata.py").write_text(code)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "moons.yaml").write_text(config)
    (command,) = commands(blocks(text, "bash")[1])
    env, argv = split_env(python_command(command, DIR=str(tmp_path)))
    run([*argv, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}", "threads=1"], env)
    assert (tmp_path / "run" / "metrics.json").is_file()
