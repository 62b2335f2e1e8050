import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_distill_script.py")


def test_ddp_each_rank_holds_its_teacher_and_caches_its_shard(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["student_sum"] == ranks[1]["student_sum"]  # DDP kept the students in step
    for rank in ranks:
        assert rank["teacher_training"] is False and rank["bn_unchanged"]
        # 1257 training samples, split between the two ranks each epoch (Lightning reshuffles the shards):
        # each rank caches what its shards held, and reads back what comes round again
        assert 629 <= rank["cached_samples"] < 1257
        assert rank["cache_lookups"] == 2 * 629 and 0 < rank["cache_hits"] < 629
    assert ranks[0]["cached_samples"] + ranks[1]["cached_samples"] >= 1257
