import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_pruning_script.py")


def test_ddp_ranks_share_masks_and_sparsity(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for rank in ranks:
        assert rank["target"] == pytest.approx(0.7)
        assert rank["sparsity"] == pytest.approx(0.7, abs=1e-4)
    # the report is written once, by rank zero
    assert [p.name for p in tmp_path.glob("report*.json")] == ["report.json"]
