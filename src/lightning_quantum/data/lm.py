"""A causal language-modelling corpus that ships with CPython, its tokenizer and its DataModule.

The documents are the help topics of ``pydoc_data.topics`` and the docstrings of the standard
library's modules, read from their source with ``ast`` (nothing is imported, nothing downloaded).
They are split by document, so no held-out paragraph is seen in training, and a byte-level BPE
tokenizer is trained on the training documents only (Hugging Face ``tokenizers``), once per
corpus and settings: it is cached on disk under a key of both.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_quantum._cache import cache_root, write_whole
from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._validation import check_fraction, check_positive, check_positive_int
from lightning_quantum.data._split import SeededSplitDataModule, check_split_settings

# Imported inside the functions that use them: tokenizers and transformers (slow to import).

__all__ = [
    "END_OF_TEXT",
    "SOURCES",
    "TextLMDataModule",
    "cpython_documents",
    "split_documents",
    "train_tokenizer",
    "unigram_perplexity",
]

#: The token between documents, and the tokenizer's end-of-sequence and padding token.
END_OF_TEXT = "<|endoftext|>"

# Standard-library folders that are tests, demos, tools or vendored code rather than library docs.
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip"}


def _module_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if any(p in _SKIPPED_DIRS or p == "__pycache__" for p in parts):
            continue
        yield ".".join(p for p in parts if p != "__init__"), path


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = (
        n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


#: The corpus's sources: CPython's help topics, and the standard library's docstrings.
SOURCES = ("topics", "docstrings")


def _stdlib_docstrings() -> dict[str, str]:
    """``module:<dotted name>`` -> its docstrings, read from the source of this Python's standard library.

    Parsing the whole library takes about 10 s here, so the result is kept in the package's cache
    (``corpus/``), keyed by this Python's version and library path.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(json.dumps([sys.version, str(stdlib)]).encode()).hexdigest()[:16]
    path = cache_root() / "corpus" / f"stdlib-docstrings-{key}.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass  # not cached yet, or damaged: read again
    documents = {}
    for name, file in _module_files(stdlib):
        try:
            docs = _docstrings(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse is not part of its corpus
        if docs and name:
            documents[f"module:{name}"] = "\n\n".join(docs)
    write_whole(path, lambda tmp: tmp.write_text(json.dumps(documents), encoding="utf-8"))
    return documents


def _check_sources(sources: tuple[str, ...]) -> tuple[str, ...]:
    if not sources or any(source not in SOURCES for source in sources):
        raise ValueError(
            f"`sources`={list(sources)!r} is not valid. Choose one or more of: {', '.join(map(repr, SOURCES))}."
        )
    return sources


@lru_cache(maxsize=4)
def cpython_documents(sources: tuple[str, ...] = SOURCES) -> dict[str, str]:
    """Every document of the corpus by name, in a fixed order: ``topic:<key>`` for each help topic
    (``"topics"``) and ``module:<dotted name>`` for each standard-library module with docstrings
    (``"docstrings"``: all of its module, class and function docstrings, in source order, one
    paragraph each).

    Raises:
        ValueError: for an empty ``sources`` or an unknown source.
    """
    _check_sources(sources)
    documents = {}
    if "topics" in sources:
        documents.update({f"topic:{key}": topics[key].strip() for key in sorted(topics) if topics[key].strip()})
    if "docstrings" in sources:
        documents.update(_stdlib_docstrings())
    return documents


def split_documents(
    names: Sequence[str], val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 42
) -> dict[str, list[str]]:
    """A seeded split of document ``names`` into ``train``, ``val`` and ``test`` (each sorted): the same
    names and seed always give the same split, whatever order the names come in."""
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    ordered = sorted(set(names))
    order = np.random.RandomState(seed).permutation(len(ordered))
    n_test = max(1, int(round(len(ordered) * test_fraction)))
    n_val = max(1, int(round(len(ordered) * val_fraction)))
    picked = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {split: sorted(ordered[i] for i in idx) for split, idx in picked.items()}


def _tokenizer_key(texts: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    import tokenizers

    digest = hashlib.sha256()
    digest.update(json.dumps([tokenizers.__version__, vocab_size, min_frequency, END_OF_TEXT]).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:24]


def train_tokenizer(
    texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2, cache_dir: str | Path | None = None
) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``.

    Trained once per texts and settings: the file is kept in ``cache_dir`` (default
    ``tokenizers/`` under the package's cache, ``$LIGHTNING_QUANTUM_CACHE`` or
    ``~/.cache/lightning_quantum``) under a key of the ``tokenizers`` version, the settings and the
    texts, and read back from there. Its end-of-sequence and padding token is ``<|endoftext|>``.

    Raises:
        ValueError: for ``vocab_size`` < 257 (the 256 bytes and the end-of-text token) or
            ``min_frequency`` < 1.
    """
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"`vocab_size`={vocab_size!r} is not valid. It must be an integer >= 257 (256 bytes + 1).")
    check_positive("min_frequency", min_frequency)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = folder / f"bpe-{_tokenizer_key(texts, vocab_size, min_frequency)}.json"
    tokenizer = None
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache file is trained again and replaced
            tokenizer = None
    if tokenizer is None:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT], show_progress=False
        )
        write_whole(path, lambda tmp: bpe.save(str(tmp)))  # DDP ranks may train it at once
        tokenizer = Tokenizer.from_file(str(path))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def unigram_perplexity(train_ids: Tensor, held_out_ids: Tensor, vocab_size: int) -> float:
    """The held-out perplexity of a unigram model of the training tokens (add-one smoothed): the bar
    a language model must clear to have learned anything beyond token frequencies."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(math.exp(-log_probs[held_out_ids.flatten()].mean()))


class _Blocks(Dataset):
    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.blocks[i]


class TextLMDataModule(SeededSplitDataModule):
    """CPython's help topics and standard-library docstrings as blocks of tokens for a causal LM.

    The documents (:func:`cpython_documents`) are split by document (:func:`split_documents`); a
    byte-level BPE tokenizer is trained on the training documents only (:func:`train_tokenizer`,
    cached on disk). Each split's documents are tokenized in order, each followed by
    ``<|endoftext|>``, and cut into blocks of ``context`` tokens; a batch is a ``(batch, context)``
    tensor of token ids (the model shifts them for its labels). Training blocks are shuffled by the
    epoch-seeded sampler, so a resumed fit sees the batches the uninterrupted one saw.

    Args:
        batch_size: blocks per training batch.
        context: tokens per block.
        vocab_size: the tokenizer's vocabulary.
        val_fraction: share of documents held out for validation.
        test_fraction: share of documents held out for test.
        seed: seed of the split and the shuffling.
        eval_batch_size: blocks per validation and test batch (``batch_size`` when ``None``).
        max_documents: keep only the first documents of each split (in name order), for quick runs.
        tokenizer_dir: where trained tokenizers are cached (see :func:`train_tokenizer`).
        sources: ``"topics"``, ``"docstrings"`` or both (see :func:`cpython_documents`).
    """

    def __init__(
        self,
        batch_size: int = 16,
        context: int = 128,
        vocab_size: int = 4096,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 42,
        eval_batch_size: int | None = None,
        max_documents: int | None = None,
        tokenizer_dir: str | None = None,
        sources: Sequence[str] = SOURCES,
    ) -> None:
        super().__init__()
        self.sources = _check_sources(tuple(sources))
        check_split_settings(batch_size, eval_batch_size, val_fraction, test_fraction, max_held_out=0.5)
        check_positive_int("context", context)
        if max_documents is not None:
            check_positive_int("max_documents", max_documents)
        save_plain_hyperparameters(self)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.context = context
        self.vocab_size = vocab_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.max_documents = max_documents
        self.tokenizer_dir = tokenizer_dir
        self.num_workers = 0
        self.splits: dict[str, Dataset[Any]] = {}
        self.documents: dict[str, list[str]] = {}
        self.token_ids: dict[str, Tensor] = {}
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        corpus = cpython_documents(self.sources)
        names = split_documents(list(corpus), self.val_fraction, self.test_fraction, self.seed)
        if self.max_documents is not None:
            names = {split: docs[: self.max_documents] for split, docs in names.items()}
        self.documents = names
        self.tokenizer = train_tokenizer(
            [corpus[n] for n in names["train"]], vocab_size=self.vocab_size, cache_dir=self.tokenizer_dir
        )
        eos = int(self.tokenizer.eos_token_id)
        for split, docs in names.items():
            encoded = self.tokenizer([corpus[n] for n in docs], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([t for doc in encoded for t in (*doc, eos)], dtype=torch.long)
            self.token_ids[split] = ids
            usable = (len(ids) // self.context) * self.context
            if usable == 0:
                raise ValueError(
                    f"The {split} split has {len(ids)} tokens, fewer than `context`={self.context}: raise "
                    "`max_documents` or the split's fraction, or lower `context`."
                )
            self.splits[split] = _Blocks(ids[:usable].view(-1, self.context))

    def unigram_perplexity(self, split: str = "test") -> float:
        """Perplexity on ``split`` of a unigram model of the training tokens (:func:`unigram_perplexity`)."""
        self.setup()
        return unigram_perplexity(self.token_ids["train"], self.token_ids[split], len(self.tokenizer))

    def tokenizer_config(self) -> Mapping[str, Any]:
        """What a model built for this data needs: the vocabulary size and the special token ids."""
        self.setup()
        return {"vocab_size": len(self.tokenizer), "eos_token_id": int(self.tokenizer.eos_token_id)}
