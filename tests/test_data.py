import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_quantum.data import DigitsDataModule, load_digits_arrays


def test_split_is_seeded_disjoint_and_complete():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    ia, ib = a.split_indices(1797), b.split_indices(1797)
    for name in ("train", "val", "test"):
        assert np.array_equal(ia[name], ib[name])
    assert len(ia["test"]) == len(ia["val"]) == 270 and len(ia["train"]) == 1257
    assert len(np.unique(np.concatenate(list(ia.values())))) == 1797
    assert not np.array_equal(DigitsDataModule(seed=4).split_indices(1797)["test"], ia["test"])


def test_normalized_with_train_statistics_and_layouts():
    dm = DigitsDataModule(layout="image")
    dm.setup("fit")
    x_train, y_train = dm.splits["train"].tensors
    assert x_train.shape == (1257, 1, 8, 8) and y_train.dtype == torch.int64
    flat = x_train.flatten(1)
    informative = dm.std > 1e-3 * 1.01
    torch.testing.assert_close(flat.mean(0)[informative], torch.zeros(int(informative.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0)[informative], torch.ones(int(informative.sum())), atol=1e-4, rtol=0)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (1, 8, 8)


def test_data_dir_with_a_copy_of_the_data(tmp_path):
    x, y = load_digits_arrays()
    with gzip.open(tmp_path / "digits.csv.gz", "wt") as fh:
        np.savetxt(fh, np.column_stack([x[:100], y[:100]]), delimiter=",", fmt="%d")
    x2, y2 = load_digits_arrays(tmp_path)
    assert np.array_equal(x2, x[:100]) and np.array_equal(y2, y[:100])


def test_missing_data_dir_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data_dir`='.*missing' does not exist.*set it to null"):
        DigitsDataModule(data_dir=tmp_path / "missing")


def test_data_dir_without_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds none of \['digits.csv.gz', 'digits.csv'\]"):
        load_digits_arrays(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -8}, r"`batch_size`=-8 is not valid. It must be a positive integer"),
        ({"batch_size": 2.5}, r"`batch_size`=2.5 is not valid. It must be a positive integer"),
        ({"layout": "nchw"}, r"`layout`='nchw' is not valid. Choose one of: 'flat', 'image'"),
        ({"val_fraction": 1.2}, r"`val_fraction`=1.2 is not valid"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, r"leave under 10% for training"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_sentence_split_holds_out_whole_paragraphs_and_spans_of_several_widths():
    from lightning_quantum.data import SentenceDataModule

    one = SentenceDataModule(window_words=16, window_stride=6).split_texts()
    several = SentenceDataModule(window_words=[8, 16], window_stride=[5, 6]).split_texts()
    train_text = " ".join(several["train"])
    assert several["test"] == one["test"] and several["val"] == one["val"]
    assert not any(sentence in train_text for sentence in several["test"] + several["val"])
    assert set(one["train"]) < set(several["train"])
    assert any(len(item.split()) == 8 for item in several["train"])
    only_sentences = SentenceDataModule(window_words=0).split_texts()["train"]
    assert set(only_sentences) < set(one["train"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_words": [8, 16], "window_stride": [5]}, r"`window_stride`=\[5\] must be one stride, or one per"),
        ({"window_words": []}, r"must not be empty"),
        ({"window_words": -4}, r"`window_words`=-4 is not valid: give whole word counts >= 0"),
        ({"window_words": [8, 2.5]}, r"`window_words`=\[8, 2.5\] is not valid"),
        ({"window_stride": 0}, r"`window_stride`=0 is not valid: give whole word counts >= 1"),
        ({"batch_size": 0}, r"`batch_size`=0 is not valid"),
    ],
)
def test_sentence_data_invalid_arguments(kwargs, match):
    from lightning_quantum.data import SentenceDataModule

    with pytest.raises(ValueError, match=match):
        SentenceDataModule(**kwargs)


def test_epoch_seeded_sampler_shards_pads_and_skips_like_distributed_sampler():
    from torch.utils.data import DistributedSampler

    from lightning_quantum.data import EpochSeededSampler

    data = list(range(11))
    done = {"n": 0}
    ranks = [EpochSeededSampler(data, seed=3, samples_done=lambda: done["n"], num_replicas=3, rank=r) for r in range(3)]
    assert all(isinstance(s, DistributedSampler) for s in ranks)  # Lightning leaves it unwrapped
    full = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [4, 4, 4] and all(len(f) == 4 for f in full)
    flat = sorted(i for f in full for i in f)
    assert set(flat) == set(data) and len(flat) == 12  # every sample, one padded repeat
    done["n"] = 6  # two batches of 1 per rank were done before a restart: the rest of each rank's shard
    assert [list(s) for s in ranks] == [f[2:] for f in full]
    for s in ranks:
        s.set_epoch(1)
    done["n"] = 0
    assert [list(s) for s in ranks] != full  # another order each epoch
    with pytest.raises(ValueError, match=r"`rank`=3 is not valid. It must be an integer in \[0, 3\)"):
        EpochSeededSampler(data, seed=3, num_replicas=3, rank=3)


@pytest.mark.parity
def test_ddp_epochs_reshuffle_cover_the_data_and_resume_mid_epoch_exactly(tmp_path):
    from tests.conftest import run_rank_script

    ranks = run_rank_script(Path(__file__).with_name("ddp_resume_script.py"), tmp_path)
    for epoch in ("0", "1"):
        seen = ranks[0]["whole"][epoch] + ranks[1]["whole"][epoch]
        assert set(seen) == set(range(1257)) and len(seen) == 1258  # once each, plus DistributedSampler's pad
    assert ranks[0]["whole"]["0"] != ranks[0]["whole"]["1"]  # set_epoch reached the sampler
    for rank in ranks:
        assert rank["checkpoint_step"] == 55
        # the interrupted run and its resume saw exactly what the uninterrupted run saw, in order
        assert rank["cut"]["0"] == rank["whole"]["0"]
        assert rank["cut"]["1"] + rank["rest"]["1"] == rank["whole"]["1"] and "0" not in rank["rest"]
        assert rank["resumed_weights"] == rank["whole_weights"]  # the same steps on the same batches: bitwise
    assert ranks[0]["whole_weights"] == ranks[1]["whole_weights"]
