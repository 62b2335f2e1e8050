"""The README's Python snippet runs as written, and its links lead to files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_fits_on_a_few_screens():
    assert len(README.splitlines()) <= 350


def test_the_python_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "trainer.fit" in block)
    monkeypatch.chdir(tmp_path)  # the report and the logs go under the working directory
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.current_epoch == 5
    assert list(tmp_path.rglob("report.json")), "the OptimizationReport wrote no report"


DOCS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
DOCUMENTS = ["README.md", "benchmarks/README.md", *DOCS]


@pytest.mark.parametrize("path", DOCUMENTS)
def test_every_relative_link_leads_to_a_file(path):
    document = ROOT / path
    for target in re.findall(r"\]\(([^)#]+)\)", document.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        assert (document.parent / target).exists(), f"{path} links to {target}, which does not exist"
