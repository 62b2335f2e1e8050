from pathlib import Path

import pytest

from tests.conftest import run_rank_script

pytestmark = pytest.mark.parity

SCRIPT = Path(__file__).with_name("ddp_pruning_script.py")


def test_ddp_ranks_share_masks_and_sparsity(tmp_path):
    ranks = run_rank_script(SCRIPT, tmp_path)
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for rank in ranks:
        assert rank["target"] == pytest.approx(0.7)
        assert rank["sparsity"] == pytest.approx(0.7, abs=1e-4)
    # the report is written once, by rank zero
    assert [p.name for p in tmp_path.glob("report*.json")] == ["report.json"]
