from pathlib import Path

import pytest

from tests.conftest import run_rank_script

pytestmark = pytest.mark.parity

SCRIPT = Path(__file__).with_name("ddp_distill_script.py")


@pytest.mark.slow
def test_ddp_each_rank_holds_its_teacher_and_caches_its_shard(tmp_path):
    ranks = run_rank_script(SCRIPT, tmp_path)
    assert ranks[0]["student_sum"] == ranks[1]["student_sum"]  # DDP kept the students in step
    for rank in ranks:
        assert rank["teacher_training"] is False and rank["bn_unchanged"]
        # 1257 training samples, split between the two ranks each epoch (Lightning reshuffles the shards):
        # each rank caches what its shards held, and reads back what comes round again
        assert 629 <= rank["cached_samples"] < 1257
        assert rank["cache_lookups"] == 2 * 629 and 0 < rank["cache_hits"] < 629
    assert ranks[0]["cached_samples"] + ranks[1]["cached_samples"] >= 1257
