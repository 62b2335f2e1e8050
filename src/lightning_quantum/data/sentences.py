"""Sentences from CPython's help topics, tokenized for a Hugging Face encoder, as a DataModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._validation import check_fraction, check_positive
from lightning_quantum.data._split import SeededSplitDataModule
from lightning_quantum.data.text import corpus_paragraphs, minilm_path, paragraph_sentences, word_windows

# Imported inside the functions that use them: transformers (slow to import).

__all__ = ["SentenceDataModule"]


class _Tokenized(Dataset):
    def __init__(self, encoded: dict[str, torch.Tensor]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return int(self.encoded["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": {k: v[i] for k, v in self.encoded.items()}, "index": i}


class SentenceDataModule(SeededSplitDataModule):
    """Unlabeled English text (for distilling sentence embeddings), with a seeded train/val/test split.

    The split is by paragraph of CPython's help topics, so no training text overlaps a held-out
    sentence. Validation and test items are the prose sentences of their paragraphs. Training items
    are the sentences of the training paragraphs plus, unless ``window_words`` is 0, spans of
    ``window_words`` words every ``window_stride`` words of those paragraphs: distillation needs no
    labels, and the spans give the student several times more text to match the teacher on. Several
    widths (``window_words=[8, 16, 24]`` with a stride each) give spans of several lengths; on
    all-MiniLM-L6-v2 they brought the student closer to the teacher on held-out sentences than more
    epochs over one width did (``benchmarks/minilm_recipes.py``).

    Batches are ``{"x": {"input_ids", "attention_mask"}, "index": sample indices}``: the inputs go to
    the model as keywords, and the indices let a teacher's outputs be cached.

    Args:
        batch_size: items per batch.
        max_length: tokens per item (padded and truncated to it).
        val_fraction: share of paragraphs held out for validation.
        test_fraction: share of paragraphs held out for test (the held-out sentences of the benchmark).
        seed: seed of the split and of the shuffling.
        tokenizer_path: directory of the tokenizer; all-MiniLM-L6-v2's when ``None``.
        window_words: words per training span, or a list of widths; 0 trains on whole sentences only.
        window_stride: words between the starts of consecutive spans: one for all widths, or one per width.
    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 42,
        tokenizer_path: str | None = None,
        window_words: int | Sequence[int] = 16,
        window_stride: int | Sequence[int] = 6,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        widths = [window_words] if isinstance(window_words, int) else list(window_words)
        strides = [window_stride] * len(widths) if isinstance(window_stride, int) else list(window_stride)
        if not widths or len(strides) != len(widths):
            raise ValueError(
                f"`window_stride`={window_stride!r} must be one stride, or one per width of "
                f"`window_words`={window_words!r} (which must not be empty)."
            )
        for width, stride in zip(widths, strides):
            if isinstance(width, bool) or not isinstance(width, int) or width < 0:
                raise ValueError(f"`window_words`={window_words!r} is not valid: give whole word counts >= 0.")
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise ValueError(f"`window_stride`={window_stride!r} is not valid: give whole word counts >= 1.")
        check_positive("max_length", max_length)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        save_plain_hyperparameters(self)
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.eval_batch_size = batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer_path = tokenizer_path
        # (width, stride) per span length; a width of 0 adds no spans
        self.windows = [(w, st) for w, st in zip(widths, strides) if w]
        self.splits: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or minilm_path(), local_files_only=True)
        for name, texts in self.split_texts().items():
            encoded = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self.splits[name] = _Tokenized(
                {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
            )

    def split_texts(self) -> dict[str, list[str]]:
        """The texts of each split, before tokenization (deduplicated, in a fixed order)."""
        paragraphs = corpus_paragraphs()
        chosen = {
            name: [paragraphs[i] for i in sorted(idx)] for name, idx in self.split_indices(len(paragraphs)).items()
        }
        train_text = " ".join(chosen["train"])
        texts = {}
        for name in ("val", "test"):  # held-out sentences whose words also occur in training text are dropped
            sentences = (s for p in chosen[name] for s in paragraph_sentences(p))
            texts[name] = [s for s in dict.fromkeys(sentences) if s not in train_text]
        train = [s for p in chosen["train"] for s in paragraph_sentences(p)]
        for width, stride in self.windows:
            train += [w for p in chosen["train"] for w in word_windows(p, width, stride)]
        texts["train"] = list(dict.fromkeys(train))
        return texts
