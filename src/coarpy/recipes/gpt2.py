"""GPT-2 small on TinyStories: 64,512 Conv1D input rows, 500 validation stories.

The paper's language-model setup: Hugging Face's ``gpt2`` (GPT-2 small), whose
components are the input rows of every block's four Conv1D layers
(:func:`~coarpy.recipes.specs.gpt2_reference_spec`), attributed for the mean
next-token margin (``coarpy.outputs.token_margin``) over each of the last 500 stories
of TinyStories' validation split, each cut to at most 1,024 tokens and padded on the
right (padding is excluded from the margin).

Nothing is downloaded: the model and its tokenizer are read from a folder (or from the
Hugging Face cache, offline), the stories from local files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import _batching as B
from ..components import Components
from ..errors import DatasetFormatError, DatasetNotFoundError
from . import _sources
from .paper import settings
from .specs import gpt2_reference_spec

DATA_ENV = "COARPY_TINYSTORIES"
MODEL_ENV = "COARPY_GPT2"
N_STORIES = 500
MAX_LENGTH = 1024
_DATA_HOW = (
    "Download TinyStories' validation split, e.g. `huggingface-cli download "
    "roneneldan/TinyStories --repo-type dataset --include 'data/validation-*' "
    "--local-dir DIR` (a parquet file, 9 MB), or its TinyStories-valid.txt, or a folder "
    "saved with datasets' save_to_disk."
)
_MODEL_HOW = (
    "Save GPT-2 small and its tokenizer to a folder DIR, e.g. `huggingface-cli download "
    "gpt2 --local-dir DIR` (or GPT2LMHeadModel/GPT2TokenizerFast.from_pretrained('gpt2') "
    "then .save_pretrained(DIR) on a machine with network access)."
)


# -- the stories -------------------------------------------------------------------------


def _story_source(path: Path) -> Path | None:
    """The file or folder under ``path`` that holds the validation stories, or None."""
    if path.is_file():
        return path if path.suffix in (".parquet", ".txt") else None
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return path  # saved with datasets' save_to_disk
    for pattern in ("validation-*.parquet", "data/validation-*.parquet", "TinyStories-valid.txt"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    return None


def _read_stories(source: Path) -> list[str]:
    if source.suffix == ".txt":
        text = source.read_text(encoding="utf-8")
        return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    if source.suffix == ".parquet":
        pq = _sources.require("pyarrow.parquet", "pyarrow", "Reading TinyStories' parquet file")
        table = pq.read_table(source)
        if "text" not in table.column_names:
            raise DatasetFormatError(
                f"{source} has no 'text' column (columns: {table.column_names}). Pass "
                "TinyStories' validation parquet file."
            )
        return [str(s) for s in table.column("text").to_pylist()]
    datasets = _sources.require("datasets", "datasets", "Reading a dataset saved with save_to_disk")
    loaded = datasets.load_from_disk(str(source))
    if isinstance(loaded, datasets.DatasetDict):
        if "validation" not in loaded:
            raise DatasetFormatError(
                f"{source} holds splits {list(loaded)}, not 'validation'. Save TinyStories' "
                "validation split."
            )
        loaded = loaded["validation"]
    return [str(s) for s in loaded["text"]]


def tinystories(
    data_dir: str | os.PathLike | None = None, *, n_examples: int = N_STORIES
) -> list[str]:
    """The last ``n_examples`` stories of TinyStories' validation split, as text.

    The paper's 500 are the last 500 rows of the Hugging Face validation split
    (``train_test_split(test_size=500, shuffle=False)["test"]`` in its scripts).

    Parameters
    ----------
    data_dir : the validation parquet file (or a folder holding ``data/validation-*``),
        ``TinyStories-valid.txt``, or a ``save_to_disk`` folder; default
        ``$COARPY_TINYSTORIES``.
    n_examples : how many stories, counted from the end.
    """
    _sources.check_count("n_examples", n_examples)
    source = _sources.locate(
        data_dir, DATA_ENV, what="TinyStories' validation split", how=_DATA_HOW,
        accept=_story_source,
    )  # fmt: skip
    stories = _read_stories(source)
    if len(stories) < n_examples:
        raise DatasetFormatError(
            f"{source} holds {len(stories)} stories, fewer than the {n_examples} asked for."
        )
    return stories[-n_examples:]


# -- the model ---------------------------------------------------------------------------


def _pretrained(model_dir: str | os.PathLike | None):
    """GPT-2 small and its tokenizer from ``model_dir``, ``$COARPY_GPT2`` or the HF cache."""
    transformers = _sources.require("transformers", "'coarpy[hf]'", "The GPT-2 recipe")
    where = model_dir or os.environ.get(MODEL_ENV) or "gpt2"
    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(where, local_files_only=True)
        tokenizer = transformers.GPT2TokenizerFast.from_pretrained(where, local_files_only=True)
    except OSError as err:
        origin = "the Hugging Face cache ('gpt2')" if where == "gpt2" else repr(str(where))
        raise DatasetNotFoundError(
            f"GPT-2 small was not found in {origin} ({str(err).splitlines()[0]}). "
            f"{_MODEL_HOW} Then pass model_dir=DIR, or set {MODEL_ENV}=DIR. Nothing is "
            "downloaded automatically."
        ) from err
    return model.eval(), tokenizer


def tokenize(stories: list[str], tokenizer: Any, *, max_length: int = MAX_LENGTH) -> dict:
    """``{"input_ids", "attention_mask"}`` (n, longest), cut at ``max_length`` tokens and
    padded on the right with the end-of-text token (masked out)."""
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    encoded = tokenizer(
        stories, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def tinystories_gpt2(
    *,
    data_dir: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    random_weights: bool = False,
    n_examples: int = N_STORIES,
    max_length: int = MAX_LENGTH,
    batch_size: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    """Setup D: GPT-2 small, 64,512 Conv1D input rows, 500 TinyStories validation stories.

    Usable from a run configuration as ``factory = "coarpy.recipes:tinystories_gpt2"``.
    The paper's settings: α = 0.025, 100,000 masks, output ``token_margin``.

    Parameters
    ----------
    data_dir : TinyStories' validation split (see :func:`tinystories`).
    model_dir : a folder with GPT-2 small and its tokenizer (default ``$COARPY_GPT2``,
        else the Hugging Face cache, offline).
    random_weights : a randomly initialised GPT-2 small (``transformers.GPT2Config()``)
        and random token sequences of ``max_length`` tokens; needs no file.
    n_examples : how many stories (the last ones of the split).
    max_length : tokens per story at most.
    batch_size : stories per forward pass (a run configuration's ``batch_size``, when
        set, takes precedence).
    seed : the seed of the random weights and tokens.

    Returns
    -------
    ``{"model", "data", "components", "output": "token_margin", "alpha", "n_masks",
    "setup"}``; ``data`` is a list of ``{"input_ids", "attention_mask"}`` batches, all
    padded to the longest story.

    Raises
    ------
    MissingExtraError : transformers is not installed.
    DatasetNotFoundError : the model or the stories are not there.
    """
    _sources.check_count("n_examples", n_examples)
    _sources.check_count("max_length", max_length, at_most=MAX_LENGTH)
    _sources.check_count("batch_size", batch_size)
    if random_weights:
        transformers = _sources.require("transformers", "'coarpy[hf]'", "The GPT-2 recipe")
        config = transformers.GPT2Config()
        model = _sources.seeded(lambda: transformers.GPT2LMHeadModel(config), seed).eval()
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (n_examples, max_length), generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        stories = tinystories(data_dir, n_examples=n_examples)
        model, tokenizer = _pretrained(model_dir)
        data = tokenize(stories, tokenizer, max_length=max_length)
    return {
        "model": model,
        "data": B.split(data, batch_size),
        "components": Components.from_spec(model, gpt2_reference_spec(model)),
        "output": "token_margin",
        **settings("tinystories_gpt2"),
    }
