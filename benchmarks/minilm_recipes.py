"""How close can a 3-layer student get to all-MiniLM-L6-v2 on held-out sentences? Recipes side by side.

    python benchmarks/minilm_recipes.py                    # all recipes, about 25 minutes on 2 cores
    python benchmarks/minilm_recipes.py --recipes widths   # one of them

`benchmarks/distillation.py` measures the recipe that `lq-train experiment=distill_minilm` uses. This
study asks what else moves the held-out cosine, with a plain PyTorch loop (the same student, data
split, loss and schedule, without Lightning's per-step bookkeeping) so that recipes compare on
training time alone:

- ``spans16``: sentences and 16-word spans of the training paragraphs (3,725 items), 3 epochs;
- ``widths``: sentences and 8-, 16- and 24-word spans (8,738 items), 3 epochs, as in distillation.py;
- ``widths_dropout``: the same with the teacher's dropout (0.1) kept in the student;
- ``widths_unfrozen``: ``widths`` with the token embedding table trained too;
- ``perturbed``: ``widths`` plus a copy of each item with 15% of its words deleted, replaced or
  followed by another word of the training text (16,020 items), 3 epochs;
- ``long``: ``perturbed`` with two more losses, the MSE of the last hidden states token by token and
  of student layers 1, 2 against teacher layers 2, 4, for 6 epochs.

Each student starts from the teacher's layers 0, 4, 5 with the token embedding table frozen and no
dropout (unless said), AdamW 5e-4 with a cosine schedule, batch 32. The held-out set is
`SentenceDataModule`'s test split: 227 sentences of paragraphs no training item overlaps. Writes
benchmarks/results/minilm_recipes.json (a run of some recipes replaces theirs and keeps the others).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_quantum.data import SentenceDataModule  # noqa: E402
from lightning_quantum.data.text import corpus_paragraphs, mean_pool, word_windows  # noqa: E402
from lightning_quantum.distillation import minilm_student, minilm_teacher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_recipes.json"
SEED, LR, BATCH, MAX_LENGTH, LAYERS = 42, 5e-4, 32, 32, (0, 4, 5)
RECIPES: dict[str, dict[str, Any]] = {
    "spans16": {"widths": [(16, 6)], "epochs": 3},
    "widths": {"widths": [(8, 5), (16, 6), (24, 9)], "epochs": 3},
    "widths_dropout": {"widths": [(8, 5), (16, 6), (24, 9)], "epochs": 3, "dropout": None},
    "widths_unfrozen": {"widths": [(8, 5), (16, 6), (24, 9)], "epochs": 3, "freeze_word_embeddings": False},
    "perturbed": {"widths": [(8, 5), (16, 6), (24, 9)], "epochs": 3, "perturb": 0.15},
    "long": {
        "widths": [(8, 5), (16, 6), (24, 9)],
        "epochs": 6,
        "perturb": 0.15,
        "token_weight": 1.0,
        "hidden_pairs": [(1, 2), (2, 4)],
    },
}


def _texts(widths: list[tuple[int, int]], perturb: float, seed: int) -> tuple[list[str], list[str]]:
    dm = SentenceDataModule(window_words=0, seed=SEED)
    split = dm.split_texts()
    paragraphs = corpus_paragraphs()
    train_paragraphs = [paragraphs[i] for i in sorted(dm.split_indices(len(paragraphs))["train"])]
    train = list(split["train"])
    for width, stride in widths:
        train += [w for p in train_paragraphs for w in word_windows(p, width, stride)]
    train = list(dict.fromkeys(train))
    if perturb:
        rng = random.Random(seed)
        vocabulary = [w for p in train_paragraphs for w in p.split()]
        copies = []
        for item in train:
            words: list[str] = []
            for word in item.split():
                r = rng.random()
                if r < perturb / 3:
                    continue  # deleted
                words += [rng.choice(vocabulary)] if r < 2 * perturb / 3 else [word]
                if 2 * perturb / 3 <= r < perturb:
                    words.append(rng.choice(vocabulary))  # followed by another word
            copies.append(" ".join(words) or item)
        train = list(dict.fromkeys(train + copies))
    return train, split["test"]


def run(name: str, recipe: dict[str, Any], tokenizer: Any, teacher: Any) -> dict[str, Any]:
    torch.manual_seed(SEED)
    train, test = _texts(recipe["widths"], recipe.get("perturb", 0.0), SEED)
    encode = lambda texts: tokenizer(  # noqa: E731
        texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    tr, te = encode(train), encode(test)
    hidden_pairs = recipe.get("hidden_pairs", [])
    token_weight = recipe.get("token_weight", 0.0)
    need_hidden = bool(hidden_pairs or token_weight)
    started = time.perf_counter()
    layers = sorted({t for _, t in hidden_pairs} | ({6} if token_weight else set()))
    pooled: list[torch.Tensor] = []
    kept: dict[int, list[torch.Tensor]] = {t: [] for t in layers}
    with torch.inference_mode():  # the teacher once per item (a cache)
        for i in range(0, len(train), 128):
            ids, mask = tr["input_ids"][i : i + 128], tr["attention_mask"][i : i + 128]
            out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
            pooled.append(mean_pool(out.last_hidden_state, mask))
            for t in layers:
                kept[t].append(out.hidden_states[t].half())
        target = torch.cat(pooled)
        hidden = {t: torch.cat(v) for t, v in kept.items()}
        held_out_target = teacher(input_ids=te["input_ids"], attention_mask=te["attention_mask"])
    student = minilm_student(
        LAYERS, dropout=recipe.get("dropout", 0.0), freeze_word_embeddings=recipe.get("freeze_word_embeddings", True)
    )
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    steps = recipe["epochs"] * math.ceil(len(train) / BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
    )
    lengths = tr["attention_mask"].sum(1)
    per_epoch = []
    for epoch in range(recipe["epochs"]):
        student.train()
        for batch in torch.randperm(len(train)).split(BATCH):
            width = int(lengths[batch].max())  # trimmed padding: the same result, less work
            ids, mask = tr["input_ids"][batch, :width], tr["attention_mask"][batch, :width]
            out = student.model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
            loss = (1 - F.cosine_similarity(mean_pool(out.last_hidden_state, mask), target[batch])).mean()
            m = mask.unsqueeze(-1).float()
            pairs = [(3, 6, token_weight)] if token_weight else []
            for s, t, w in pairs + [(s, t, 1.0) for s, t in hidden_pairs]:
                error = (out.hidden_states[s] - hidden[t][batch, :width].float()) ** 2
                loss = loss + w * (error * m).sum() / (m.sum() * error.shape[-1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        student.eval()
        with torch.inference_mode():
            sims = F.cosine_similarity(
                student(input_ids=te["input_ids"], attention_mask=te["attention_mask"]), held_out_target
            )
        per_epoch.append(
            {"epoch": epoch + 1, "seconds": time.perf_counter() - started, "held_out_mean": float(sims.mean())}
        )
        print(
            f"{name} epoch {epoch + 1}: held-out mean cosine {sims.mean():.4f} after {per_epoch[-1]['seconds']:.0f} s",
            file=sys.stderr,
        )
    return {
        "recipe": {k: v for k, v in recipe.items()},
        "train_items": len(train),
        "held_out_sentences": len(test),
        "seconds": time.perf_counter() - started,
        "held_out_cosine": {
            "mean": float(sims.mean()),
            "median": float(sims.median()),
            "p10": float(sims.quantile(0.1)),
            "min": float(sims.min()),
        },
        "per_epoch": per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from lightning_quantum.data.text import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    teacher = minilm_teacher().eval()
    earlier = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else {}
    results = {name: run(name, RECIPES[name], tokenizer, teacher) for name in args.recipes}
    results = {**{k: v for k, v in earlier.items() if k in RECIPES}, **results}
    results = {name: results[name] for name in RECIPES if name in results}  # in the recipes' order
    for name, r in results.items():
        c = r["held_out_cosine"]
        print(
            f"{name:15s} items {r['train_items']:6d}  {r['seconds']:5.0f} s  "
            f"mean {c['mean']:.4f}  median {c['median']:.4f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "MiniLM distillation recipes",
                "command": "python benchmarks/minilm_recipes.py",
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
