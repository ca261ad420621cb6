"""docs/DESIGN.md is the contract: it lists exactly the metric keys of flowmatch.keys, and the repository
points to it rather than to files outside the clone."""

import re
import subprocess
from pathlib import Path

import pytest

from flowmatch import keys

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"


def documented_keys() -> list[str]:
    text = DESIGN.read_text()
    block = text.split("<!-- metric-keys: begin -->", 1)[1].split("<!-- metric-keys: end -->", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", block, flags=re.M)


def test_design_lists_exactly_the_registered_metric_keys():
    doc = documented_keys()
    assert len(doc) == len(set(doc)), "a key is listed twice"
    assert sorted(doc) == sorted(keys.all_keys())


def test_metric_refuses_unregistered_keys():
    assert keys.metric("eval/pair_acc", 7) == "eval/pair_acc@euler7"
    assert keys.gradvar_key(3, "var") == "gradvar/bin_03/var"
    with pytest.raises(KeyError):
        keys.metric("eval/pair_accuracy")
    with pytest.raises(KeyError):
        keys.metric("eval/w2", 7)
    with pytest.raises(KeyError):
        keys.gradvar_key(0, "variance")


def test_nothing_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = [
        f
        for f in files
        if f != "tests/test_design_doc.py"
        and (ROOT / f).is_file()
        and "shared/DESIGN" in (ROOT / f).read_text(errors="ignore")
    ]
    assert not offenders
