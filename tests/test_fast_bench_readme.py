"""The README's benchmark table and plots come from the committed results file (docs/results/results.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsd_node.ops.bench.readme import README_MARKS, main, readme_table, splice

ROOT = Path(__file__).resolve().parent.parent


def test_readme_table_and_plots_match_the_committed_results():
    assert main(["--results", str(ROOT / "docs/results"), "--readme", str(ROOT / "README.md"),
                 "--bench-doc", str(ROOT / "docs/bench.md"), "--check"]) == 0
    readme = (ROOT / "README.md").read_text()
    for name in json.loads((ROOT / "docs/results/results.json").read_text())["plots"]:
        assert (ROOT / "docs/results" / name).stat().st_size > 1000
    assert "](docs/results/ms_per_token.png)" in readme


def test_check_fails_on_a_hand_edited_table_and_the_command_rewrites_it(tmp_path):
    results = json.loads((ROOT / "docs/results/results.json").read_text())
    table = readme_table(results)
    assert table.count("\n") >= 3 and "| 4 | 25 | embedded | si |" in table
    readme = tmp_path / "README.md"
    readme.write_text(splice(f"intro\n{README_MARKS[0]}\n{README_MARKS[1]}\noutro\n", README_MARKS,
                             table.replace("| 4 | 25 | embedded | si |", "| 4 | 25 | embedded | si | 1.0 |")))
    shutil.copytree(ROOT / "docs/results", tmp_path / "results")
    doc = tmp_path / "bench.md"
    shutil.copy(ROOT / "docs/bench.md", doc)
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--bench-doc", str(doc)]
    assert main([*args, "--check"]) == 1
    (tmp_path / "results/adaptive/results.json").unlink(missing_ok=True)  # the README's table alone
    assert main([*args, "--no-plots"]) == 0  # drawing the plots takes seconds: `dsd bench` does it
    assert main([*args, "--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("outro\n")


def test_splice_refuses_a_file_without_marks():
    with pytest.raises(ValueError, match="bench-table"):
        splice("no marks here", README_MARKS, "x")
