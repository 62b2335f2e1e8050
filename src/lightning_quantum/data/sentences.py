"""Sentences from CPython's help topics, tokenized for a Hugging Face encoder, as a DataModule."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_quantum._validation import check_fraction, check_positive
from lightning_quantum.data._split import SeededSplitDataModule
from lightning_quantum.data.text import corpus_sentences, minilm_path

__all__ = ["SentenceDataModule"]


class _Tokenized(Dataset):
    def __init__(self, encoded: dict[str, torch.Tensor]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return int(self.encoded["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": {k: v[i] for k, v in self.encoded.items()}, "index": i}


class SentenceDataModule(SeededSplitDataModule):
    """Unlabeled sentences (for distilling sentence embeddings), with a seeded train/val/test split.

    Batches are ``{"x": {"input_ids", "attention_mask"}, "index": sample indices}``: the inputs go to
    the model as keywords, and the indices let a teacher's outputs be cached.

    Args:
        batch_size: sentences per batch.
        max_length: tokens per sentence (padded and truncated to it).
        val_fraction: share held out for validation.
        test_fraction: share held out for test (the held-out sentences of the benchmark).
        seed: seed of the split and of the shuffling.
        tokenizer_path: directory of the tokenizer; all-MiniLM-L6-v2's when ``None``.
    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 42,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("max_length", max_length)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        self.save_hyperparameters(logger=False)
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.eval_batch_size = batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer_path = tokenizer_path
        self.splits: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or minilm_path(), local_files_only=True)
        sentences = corpus_sentences()
        for name, idx in self.split_indices(len(sentences)).items():
            encoded = tokenizer(
                [sentences[i] for i in idx],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            self.splits[name] = _Tokenized(
                {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
            )
