import gzip

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
        ({"batch_size": -8}, r"`batch_size`=-8 is not valid. It must be a finite number greater than 0"),
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
