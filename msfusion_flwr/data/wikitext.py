"""WikiText-2 for causal language modelling: text, vocabulary, sequences, partitions.

Sources
    ``data-dir`` set: a folder holding the three splits as plain text, either
    ``train.txt``/``valid.txt``/``test.txt`` or WikiText's own
    ``wiki.train.tokens``/``wiki.valid.tokens``/``wiki.test.tokens`` (looked up
    per split, in that order). ``data-dir`` empty: the Hugging Face Hub,
    ``datasets.load_dataset(HUB_ID, HUB_CONFIG)`` (``Salesforce/wikitext``,
    ``wikitext-2-raw-v1``: splits ``train``/``validation``/``test``, one line
    of the text per row in column ``text``). ``train-split`` (``"train"`` or
    ``"valid"``) names the text participants and server train on; the test
    text is always the ``test`` split. A missing folder, file or Hub is a
    one-line :class:`~msfusion_flwr.data.settings.DataUnavailableError`.

Tokenisation (as PyTorch's ``word_language_model`` example)
    Every non-blank line becomes ``line.split() + ["<eos>"]``; blank lines are
    skipped. A split's tokens form one stream, lines in file order.

Vocabulary
    Built from the training text only: ``<unk>`` (id 0) and ``<eos>`` (id 1)
    first, then every other word by descending frequency, ties in code-point
    (``sorted``) order, so every node builds the same one. ``vocab-size`` > 0
    keeps the first ``vocab-size`` entries (the two special tokens included).
    Any word outside the vocabulary (a capped training word, an unseen test
    word) and the literal word ``<unk>`` of WikiText's tokenised text map to
    ``<unk>``.

Articles
    A line `` = Title = `` (one ``=`` on each side; `` = = Section = = `` is a
    subsection) starts a new article. Every token keeps its article id: the
    number of article headings up to its line, minus one (text before the first
    heading counts as article 0), so ids never decrease along the stream.

Sequences
    The training stream is cut into non-overlapping windows of ``seq-len``
    tokens (stride ``seq-len``): sequence i is ``x = ids[i L:(i+1) L]`` with
    targets ``y = ids[i L + 1:(i+1) L + 1]`` (the next token), so a stream of
    n tokens gives ``(n - 1) // L`` sequences and the last incomplete window is
    dropped. The test stream is cut the same way.

Partitions (over sequence indices, in an in-memory ``datasets.Dataset``)
    ``data-fraction`` and ``server-data-fraction`` act on the sequences exactly
    as on images (:func:`~msfusion_flwr.data.partitioning.server_split`): a seeded subset,
    less a seeded server slice that is in no partition. The rest goes through
    flwr-datasets' ``IidPartitioner``, whose ``load_partition`` is
    ``dataset.shard(num_partitions, pid, contiguous=True)``: equal-size
    (within one) consecutive ranges of the table's rows, without shuffling.
    ``"iid"`` shuffles the table with the seed first (random sequences per
    participant); ``"contiguous"`` keeps it in text order, so each participant
    holds a run of consecutive articles (non-IID by topic), participant 0 the
    first. Everything is deterministic by seed and identical on every node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .partitioning import server_split
from .settings import TEXT_PARTITIONERS, DataSettings, DataUnavailableError, one_line

UNK, EOS = "<unk>", "<eos>"
UNK_ID, EOS_ID = 0, 1
SPECIAL_TOKENS = (UNK, EOS)
"""The vocabulary's first entries, at ids ``UNK_ID`` and ``EOS_ID``."""
TRAIN_SPLITS = ("train", "valid")
FILE_NAMES = {split: (f"{split}.txt", f"wiki.{split}.tokens") for split in ("train", "valid", "test")}
"""Candidate file names of each split in ``data-dir``, first found wins."""
HUB_ID = "Salesforce/wikitext"
"""The Hub repository (or a local folder in its layout) read when ``data-dir`` is empty."""
HUB_CONFIG = "wikitext-2-raw-v1"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
HUB_CACHE_DIR: str | None = None
"""``cache_dir`` for ``datasets.load_dataset``; None: the ``datasets`` default."""
DATASET_NAME = "wikitext-2"


@dataclass(frozen=True)
class TokenizedText:
    """A split as one token stream, with the article id of every token."""

    words: tuple[str, ...]
    articles: np.ndarray  # int64, one per word, non-decreasing


@dataclass(frozen=True)
class TextCorpus:
    """The vocabulary and the encoded training and test streams of one setting."""

    vocab: tuple[str, ...]
    train_ids: np.ndarray  # int64 token ids of the training text
    train_articles: np.ndarray  # int64 article id of every training token
    test_ids: np.ndarray  # int64 token ids of the test text


# --------------------------------------------------------------------------- tokenisation


def is_article_heading(tokens: Sequence[str]) -> bool:
    """True for the tokens of `` = Title = `` (one ``=`` each side), False for `` = = Section = = ``."""
    return (
        len(tokens) >= 3
        and tokens[0] == "="
        and tokens[-1] == "="
        and tokens[1] != "="
        and tokens[-2] != "="
    )


def tokenize_lines(lines: Iterable[str]) -> TokenizedText:
    """Non-blank lines -> ``line.split() + ["<eos>"]``, concatenated; with article ids per token."""
    words: list[str] = []
    lengths: list[int] = []
    headings: list[bool] = []
    for line in lines:
        tokens = line.split()
        if not tokens:
            continue
        headings.append(is_article_heading(tokens))
        tokens.append(EOS)
        words.extend(tokens)
        lengths.append(len(tokens))
    article_of_line = np.maximum(np.cumsum(np.asarray(headings, dtype=np.int64)) - 1, 0)
    articles = np.repeat(article_of_line, np.asarray(lengths, dtype=np.int64)).astype(np.int64)
    articles.flags.writeable = False
    return TokenizedText(tuple(words), articles)


def build_vocabulary(words: Iterable[str], vocab_size: int = 0) -> tuple[str, ...]:
    """``<unk>``, ``<eos>``, then the other words by descending count, ties in ``sorted`` order.

    ``vocab_size > 0`` keeps that many entries (special tokens included; at least 2).
    """
    if vocab_size == 1 or vocab_size < 0:
        raise ValueError(f"vocab-size must be 0 (no cap) or at least {len(SPECIAL_TOKENS)}, got {vocab_size}")
    counts = Counter(words)
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab = SPECIAL_TOKENS + tuple(word for word, _ in ranked)
    return vocab[:vocab_size] if vocab_size > 0 else vocab


def encode(words: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """Token ids (int64) of ``words``; words outside ``vocab`` -> ``UNK_ID``."""
    index = {word: i for i, word in enumerate(vocab)}
    ids = np.fromiter(map(index.get, words, repeat(UNK_ID)), dtype=np.int64, count=len(words))
    ids.flags.writeable = False
    return ids


# --------------------------------------------------------------------------- reading


def locate_text_file(data_dir: str, split: str) -> Path:
    """The file of ``split`` (``train``/``valid``/``test``) in ``data_dir``; a one-line error if absent.

    When the training file is missing but the validation one exists, the
    message says to set ``train-split='valid'``.
    """
    folder = Path(data_dir).expanduser()
    expected = ", ".join(name for names in FILE_NAMES.values() for name in names)
    if not folder.is_dir():
        raise DataUnavailableError(
            f"{DATASET_NAME}: data-dir {folder} is not a folder (expected text files among: {expected})"
        )
    for name in FILE_NAMES[split]:
        if (folder / name).is_file():
            return folder / name
    message = f"{DATASET_NAME}: data-dir {folder} holds no {split} text (looked for {' or '.join(FILE_NAMES[split])})"
    if split == "train":
        valid = next((name for name in FILE_NAMES["valid"] if (folder / name).is_file()), None)
        if valid:
            message += f"; it holds {valid}: set train-split='valid' to train on the validation text"
    raise DataUnavailableError(message)


def read_file_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on ``\\n`` only (as iterating over the file does)."""
    return path.read_text(encoding="utf-8").split("\n")


def read_hub_lines(hub_id: str, split: str, cache_dir: str | None = None) -> list[str]:
    """Column ``text`` of ``load_dataset(hub_id, HUB_CONFIG)``'s split for ``split``.

    ``hub_id`` may also be a local folder in the Hub repository's layout
    (``<HUB_CONFIG>/<split>-*.parquet`` and a README.md declaring the config).
    Any failure is a one-line :class:`DataUnavailableError` that says to set data-dir.
    """
    from datasets import load_dataset

    try:
        table = load_dataset(hub_id, HUB_CONFIG, split=HUB_SPLITS[split], cache_dir=cache_dir)
        return list(table["text"])
    except Exception as exc:  # network, missing repository/config/split/column: all mean "no data here"
        raise DataUnavailableError(
            f"{DATASET_NAME} could not be loaded from the Hugging Face Hub ({hub_id}, {HUB_CONFIG}, "
            f"split {HUB_SPLITS[split]}) ({one_line(exc)}); set data-dir to a folder holding "
            "train.txt/valid.txt/test.txt or wiki.{train,valid,test}.tokens"
        ) from None


@lru_cache(maxsize=6)
def file_tokens(path: str) -> TokenizedText:
    """The tokenised text of one file (cached per path)."""
    return tokenize_lines(read_file_lines(Path(path)))


@lru_cache(maxsize=6)
def hub_tokens(hub_id: str, split: str) -> TokenizedText:
    """The tokenised text of one split of ``hub_id`` (cached)."""
    return tokenize_lines(read_hub_lines(hub_id, split, HUB_CACHE_DIR))


def load_tokens(data_dir: str, split: str, hub_id: str = HUB_ID) -> TokenizedText:
    """The tokenised text of ``split`` (``train``/``valid``/``test``): ``data_dir`` when set, else ``hub_id``."""
    if split not in FILE_NAMES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(FILE_NAMES)}")
    if data_dir:
        return file_tokens(str(locate_text_file(data_dir, split)))
    return hub_tokens(hub_id, split)


@lru_cache(maxsize=4)
def load_corpus(data_dir: str, train_split: str, vocab_size: int = 0, hub_id: str = HUB_ID) -> TextCorpus:
    """Vocabulary (from ``train_split``'s text) and the encoded training and test streams (cached)."""
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train-split must be one of {TRAIN_SPLITS}, got {train_split!r}")
    train = load_tokens(data_dir, train_split, hub_id)
    test = load_tokens(data_dir, "test", hub_id)
    vocab = build_vocabulary(train.words, vocab_size)
    return TextCorpus(vocab, encode(train.words, vocab), train.articles, encode(test.words, vocab))


def clear_caches() -> None:
    """Forget every cached text and corpus (tests; a changed file on disk)."""
    for cached in (file_tokens, hub_tokens, load_corpus):
        cached.cache_clear()


def corpus(settings: DataSettings) -> TextCorpus:
    """:func:`load_corpus` for ``settings`` (reads the module's ``HUB_ID`` at call time)."""
    hub_id = "" if settings.data_dir else HUB_ID
    return load_corpus(settings.data_dir, settings.train_split, settings.vocab_size, hub_id)


# --------------------------------------------------------------------------- sequences


def num_sequences(num_tokens: int, seq_len: int) -> int:
    """Full windows of ``seq_len`` inputs (plus the next-token target) in a stream: ``(n - 1) // seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq-len must be at least 1, got {seq_len}")
    return max(0, (num_tokens - 1) // seq_len)


def make_sequences(ids: np.ndarray, seq_len: int, rows: np.ndarray | None = None) -> TensorDataset:
    """``TensorDataset(x, y)`` of the windows ``rows`` (all by default): int64 (N, seq_len), y = x shifted by one."""
    if rows is None:
        rows = np.arange(num_sequences(len(ids), seq_len), dtype=np.int64)
    positions = np.asarray(rows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len, dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(ids[positions], dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(ids[positions + 1], dtype=np.int64))
    return TensorDataset(x, y)


def sequence_articles(settings: DataSettings) -> np.ndarray:
    """Article id of the first token of every training sequence."""
    text = corpus(settings)
    count = num_sequences(len(text.train_ids), settings.seq_len)
    return text.train_articles[np.arange(count, dtype=np.int64) * settings.seq_len]


def _split_sequences(settings: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(participants' pool, server slice)`` of training-sequence indices (:func:`server_split`)."""
    count = num_sequences(len(corpus(settings).train_ids), settings.seq_len)
    return server_split(count, settings.data_fraction, settings.server_fraction, settings.seed)


def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-sequence indices of every partition (``iid`` or ``contiguous``; see the module docstring).

    Uses flwr-datasets' ``IidPartitioner``, which shards its table into
    contiguous equal-size ranges without shuffling: on the seed-shuffled table
    that is an IID split, on the text-ordered table a contiguous one.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    if settings.partitioner not in TEXT_PARTITIONERS:
        raise ValueError(
            f"partitioner {settings.partitioner!r} is not available for {DATASET_NAME}; "
            f"choose one of {TEXT_PARTITIONERS}"
        )
    pool, _ = _split_sequences(settings)
    table = Dataset.from_dict({"index": pool})
    if settings.partitioner == "iid":
        table = table.shuffle(seed=settings.seed)
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = table
    return tuple(
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64) for pid in range(num_partitions)
    )


def load_sequences(settings: DataSettings, rows: np.ndarray) -> TensorDataset:
    """The training sequences ``rows`` as ``TensorDataset(x, y)``."""
    return make_sequences(corpus(settings).train_ids, settings.seq_len, rows)


def load_test_set(settings: DataSettings) -> TensorDataset:
    """Every full window of the test text."""
    return make_sequences(corpus(settings).test_ids, settings.seq_len)


def load_server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out training sequences (empty when ``server_fraction == 0``)."""
    _, held = _split_sequences(settings)
    return load_sequences(settings, held)


def vocabulary_size(settings: DataSettings) -> int:
    """Entries of the vocabulary, special tokens included."""
    return len(corpus(settings).vocab)


def training_examples(settings: DataSettings, rows: np.ndarray) -> TensorDataset:
    """The training sequences ``rows`` (the data package's common name for :func:`load_sequences`)."""
    return load_sequences(settings, rows)


def test_set(settings: DataSettings) -> TensorDataset:
    """Every full window of the test text (:func:`load_test_set`)."""
    return load_test_set(settings)


def server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out training sequences (:func:`load_server_set`)."""
    return load_server_set(settings)
