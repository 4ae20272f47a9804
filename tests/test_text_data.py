"""WikiText-2 (msfusion_flwr.text_data through data.py's API) on tiny generated text.

The offline layouts (``train.txt``... and ``wiki.train.tokens``...) and a local
copy in the Hub repository's layout (``wikitext-2-raw-v1/<split>-00000-of-00001.parquet``
plus a README.md whose YAML ``configs:`` block declares the config, as
``Salesforce/wikitext`` does) are written here; the Hub copy is read through
the real ``datasets.load_dataset`` path by pointing ``text_data.HUB_ID`` at it.
One test checks the real /work/shared/data/wikitext-2 when present.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from msfusion_flwr.data import (
    DataSettings,
    DataUnavailableError,
    load_partition,
    load_server_set,
    load_test_set,
    model_kwargs,
    partition_indices,
)
from msfusion_flwr.data import wikitext as td
from msfusion_flwr.data.partitioning import training_subset

REAL_WIKITEXT = Path("/work/shared/data/wikitext-2")
SEQ_LEN = 16


@pytest.fixture(autouse=True)
def clear_caches():
    td.clear_caches()
    partition_indices.cache_clear()
    yield
    td.clear_caches()
    partition_indices.cache_clear()


def make_text(num_articles: int, seed: int) -> str:
    """WikiText-like text: `` = Title = `` articles with `` = = Section = = `` parts and blank lines."""
    rng = np.random.default_rng(seed)
    common = ["the", "of", "and", "a", "in", "<unk>", ",", "."]
    lines = [" "]
    for art in range(num_articles):
        lines += [f" = Article {art} = ", " "]
        for section in range(2):
            lines += [f" = = Part {section} = = ", " "]
            for _ in range(3):
                topic = [f"topic{art}w{k}" for k in range(4)]
                words = rng.choice(common + topic, size=int(rng.integers(5, 25)))
                lines += [" " + " ".join(words) + " ", " "]
    return "\n".join(lines) + "\n"


SPLIT_TEXT = {"train": make_text(12, 0), "valid": make_text(4, 1), "test": make_text(3, 2)}


def write_text_dir(folder: Path, layout: str = "txt", splits=("train", "valid", "test"), texts=None) -> str:
    """The splits under ``<split>.txt`` (layout ``txt``) or ``wiki.<split>.tokens`` (layout ``tokens``)."""
    texts = texts or SPLIT_TEXT
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        name = f"{split}.txt" if layout == "txt" else f"wiki.{split}.tokens"
        (folder / name).write_text(texts[split], encoding="utf-8")
    return str(folder)


@pytest.fixture
def text_dir(tmp_path) -> str:
    return write_text_dir(tmp_path / "wt2")


def settings(folder: str, **kwargs) -> DataSettings:
    base = {"dataset": "wikitext-2", "data_dir": folder, "partitioner": "contiguous", "seq_len": SEQ_LEN}
    return DataSettings(**{**base, **kwargs})


def reference_words(text: str) -> list[str]:
    """The tokenisation rule written out: non-blank line -> words + <eos>."""
    return [w for line in text.split("\n") if line.split() for w in line.split() + ["<eos>"]]


# --------------------------------------------------------------------------- reading and tokenising


@pytest.mark.parametrize("layout", ["txt", "tokens"])
def test_offline_layouts_give_the_documented_tokens(tmp_path, layout):
    """Both file layouts read the same streams: words of non-blank lines + <eos>, mapped through the vocabulary."""
    folder = write_text_dir(tmp_path / layout, layout)
    corpus = td.corpus(settings(folder))
    vocab = corpus.vocab
    assert [vocab[i] for i in corpus.train_ids] == reference_words(SPLIT_TEXT["train"])
    test_words = [w if w in vocab else "<unk>" for w in reference_words(SPLIT_TEXT["test"])]
    assert [vocab[i] for i in corpus.test_ids] == test_words
    assert corpus.train_ids.dtype == np.int64 and corpus.test_ids.dtype == np.int64


def test_layouts_agree_and_train_split_valid_uses_valid_text(tmp_path):
    """txt and tokens layouts give identical corpora; train_split='valid' trains on valid."""
    a = td.corpus(settings(write_text_dir(tmp_path / "a", "txt")))
    b = td.corpus(settings(write_text_dir(tmp_path / "b", "tokens")))
    assert a.vocab == b.vocab
    assert np.array_equal(a.train_ids, b.train_ids) and np.array_equal(a.test_ids, b.test_ids)
    v = td.corpus(settings(str(tmp_path / "a"), train_split="valid"))
    assert [v.vocab[i] for i in v.train_ids] == reference_words(SPLIT_TEXT["valid"])
    assert not any(w.startswith("topic5") for w in v.vocab)  # built from valid (4 articles) only


def test_articles_follow_single_equals_headings():
    """`` = Title = `` starts an article, `` = = Sub = = `` does not; text before the first heading is article 0."""
    lines = [
        "intro words",
        "",
        " = First = ",
        " = = Sub = = ",
        "body = x =",
        " ",
        " = Second title = ",
        " = = = Subsub = = = ",
        "end",
    ]
    text = td.tokenize_lines(lines)
    assert list(text.words) == reference_words("\n".join(lines))
    # non-blank lines: intro (before any heading: 0), First, Sub, "body = x =" (no heading), Second, Subsub, end
    article_of_line = [0, 0, 0, 0, 1, 1, 1]
    lengths = [len(line.split()) + 1 for line in lines if line.split()]
    assert text.articles.tolist() == np.repeat(article_of_line, lengths).tolist()
    assert td.is_article_heading("= A =".split()) and not td.is_article_heading("= = A = =".split())
    assert not td.is_article_heading("= =".split())


def test_first_line_heading_is_article_zero():
    text = td.tokenize_lines([" = A = ", "x", " = B = ", "y"])
    assert text.articles.tolist() == [0] * 4 + [0] * 2 + [1] * 4 + [1] * 2


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_order_ties_cap_and_unk(tmp_path):
    """<unk>=0, <eos>=1, then by count desc with ties alphabetical; a cap maps the rest to <unk>."""
    texts = {
        "train": "b b b a\nc a c\n\n<unk> d\n",
        "valid": "a\n",
        "test": "b zzz <unk> c d\n",
    }
    folder = write_text_dir(tmp_path / "v", texts=texts)
    # counts: <eos> 3, b 3, a 2, c 2, d 1 (<unk> is special)
    full = td.corpus(settings(folder))
    assert full.vocab == ("<unk>", "<eos>", "b", "a", "c", "d")
    assert full.train_ids.tolist() == [2, 2, 2, 3, 1, 4, 3, 4, 1, 0, 5, 1]
    assert full.test_ids.tolist() == [2, 0, 0, 4, 5, 1]
    capped = td.corpus(settings(folder, vocab_size=4))
    assert capped.vocab == ("<unk>", "<eos>", "b", "a")
    assert capped.train_ids.tolist() == [2, 2, 2, 3, 1, 0, 3, 0, 1, 0, 0, 1]
    assert capped.test_ids.tolist() == [2, 0, 0, 0, 0, 1]
    assert model_kwargs(settings(folder, vocab_size=4)) == {"vocab_size": 4, "max_len": SEQ_LEN}
    assert model_kwargs(settings(folder, seq_len=7)) == {"vocab_size": 6, "max_len": 7}
    assert td.build_vocabulary(["z", "y", "y", "x", "z"]) == ("<unk>", "<eos>", "y", "z", "x")
    with pytest.raises(ValueError):
        td.build_vocabulary(["a"], vocab_size=1)


def test_image_model_kwargs_unchanged():
    assert model_kwargs(DataSettings(dataset="fashion-mnist")) == {"num_classes": 10, "in_channels": 1}
    assert model_kwargs(DataSettings(dataset="cifar100")) == {"num_classes": 100, "in_channels": 3}
    with pytest.raises(ValueError):
        model_kwargs(DataSettings(dataset="mnist"))


# --------------------------------------------------------------------------- sequences


@pytest.mark.parametrize("n,expected", [(11, 2), (10, 1), (5, 0), (1, 0)])
def test_make_sequences_windows_and_shift(n, expected):
    """Windows of 5 with stride 5 and the next token as target; the incomplete last window is dropped."""
    x, y = td.make_sequences(np.arange(n, dtype=np.int64), 5).tensors
    assert x.shape == y.shape == (expected, 5)
    assert x.dtype == y.dtype == torch.int64
    assert x.flatten().tolist() == list(range(5 * expected))
    assert torch.equal(y, x + 1)


def test_datasets_are_shifted_token_windows(text_dir):
    """load_partition, load_test_set: int64 (N, seq_len), y the next tokens of the stream."""
    s = settings(text_dir, partitioner="iid", seed=3)
    corpus = td.corpus(s)
    n_train = (len(corpus.train_ids) - 1) // SEQ_LEN
    windows = torch.from_numpy(corpus.train_ids[: (n_train * SEQ_LEN + 1)].copy())
    for pid, rows in enumerate(partition_indices(s, 3)):
        x, y = load_partition(s, pid, 3).tensors
        assert x.shape == y.shape == (len(rows), SEQ_LEN) and x.dtype == y.dtype == torch.int64
        for row, xs, ys in zip(rows.tolist(), x, y):
            assert torch.equal(xs, windows[row * SEQ_LEN : (row + 1) * SEQ_LEN])
            assert torch.equal(ys, windows[row * SEQ_LEN + 1 : (row + 1) * SEQ_LEN + 1])
    x, y = load_test_set(s).tensors
    n_test = (len(corpus.test_ids) - 1) // SEQ_LEN
    assert x.shape == y.shape == (n_test, SEQ_LEN) and x.dtype == torch.int64
    assert x.flatten().tolist() == corpus.test_ids[: n_test * SEQ_LEN].tolist()
    assert y.flatten().tolist() == corpus.test_ids[1 : n_test * SEQ_LEN + 1].tolist()


# --------------------------------------------------------------------------- partitions


def num_train_sequences(s: DataSettings) -> int:
    return (len(td.corpus(s).train_ids) - 1) // s.seq_len


@pytest.mark.parametrize("partitioner", ["iid", "contiguous"])
@pytest.mark.parametrize("data_fraction,server_fraction", [(1.0, 0.0), (1.0, 0.2), (0.5, 0.25)])
def test_every_sequence_in_one_partition_or_the_server(text_dir, partitioner, data_fraction, server_fraction):
    """Partitions and the server slice are disjoint and together are the data-fraction subset."""
    s = settings(
        text_dir, partitioner=partitioner, data_fraction=data_fraction, server_fraction=server_fraction, seed=4
    )
    n = num_train_sequences(s)
    parts = partition_indices(s, 4)
    assert len(parts) == 4 and all(p.dtype == np.int64 for p in parts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    server_x, server_y = load_server_set(s).tensors
    assert len(server_x) == (round(server_fraction * round(data_fraction * n)) if server_fraction else 0)
    everything = np.concatenate(parts).tolist()
    assert len(everything) == len(set(everything))
    corpus_x = td.make_sequences(td.corpus(s).train_ids, SEQ_LEN).tensors[0]
    server_rows = [int(torch.nonzero((corpus_x == row).all(dim=1))[0]) for row in server_x]
    assert set(server_rows).isdisjoint(everything)
    assert sorted(everything + server_rows) == training_subset(n, data_fraction, 4).tolist()
    assert torch.equal(server_y[:, :-1], server_x[:, 1:])


def is_range(rows: np.ndarray) -> bool:
    return len(rows) == 0 or rows.tolist() == list(range(int(rows[0]), int(rows[0]) + len(rows)))


def test_contiguous_partitions_are_runs_of_articles_and_iid_ones_are_not(text_dir):
    """contiguous: consecutive sequence ranges in text order, so article ids never go back; iid: shuffled."""
    s = settings(text_dir, partitioner="contiguous")
    articles = td.sequence_articles(s)
    parts = partition_indices(s, 4)
    assert all(is_range(p) for p in parts)
    assert np.concatenate(parts).tolist() == list(range(num_train_sequences(s)))
    for left, right in zip(parts, parts[1:]):
        assert articles[left[-1]] <= articles[right[0]]
    spans = [set(articles[p].tolist()) for p in parts]
    assert all(len(a & b) <= 1 for i, a in enumerate(spans) for b in spans[i + 1 :])  # at most a boundary article
    iid = partition_indices(settings(text_dir, partitioner="iid"), 4)
    assert not any(is_range(p) for p in iid)
    assert sorted(np.concatenate(iid).tolist()) == list(range(num_train_sequences(s)))
    assert sum(len(set(articles[p].tolist())) for p in iid) > sum(len(x) for x in spans)


def test_partitions_deterministic_by_seed(text_dir):
    """Same settings: same partitions after clearing every cache; another seed: other iid partitions."""
    for partitioner in ("iid", "contiguous"):
        options = {"partitioner": partitioner, "data_fraction": 0.7, "server_fraction": 0.1, "seed": 9}
        s = settings(text_dir, **options)
        first = partition_indices(s, 3)
        server = load_server_set(s).tensors[0]
        td.clear_caches()
        partition_indices.cache_clear()
        again = partition_indices(settings(text_dir, **options), 3)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert torch.equal(server, load_server_set(s).tensors[0])
    a = partition_indices(settings(text_dir, partitioner="iid", seed=0), 3)
    b = partition_indices(settings(text_dir, partitioner="iid", seed=1), 3)
    assert [p.tolist() for p in a] != [p.tolist() for p in b]


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological"])
def test_image_partitioners_rejected_for_text(text_dir, partitioner):
    with pytest.raises(ValueError, match="contiguous"):
        partition_indices(settings(text_dir, partitioner=partitioner), 2)


# --------------------------------------------------------------------------- errors


def error_of(s: DataSettings) -> str:
    with pytest.raises(DataUnavailableError) as info:
        load_test_set(s)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_or_files_are_one_line_errors(tmp_path):
    """Missing folder, empty folder, missing test file: one line naming the folder and the files looked for."""
    message = error_of(settings(str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in message and "train.txt" in message and "wiki.train.tokens" in message
    (tmp_path / "empty").mkdir()
    message = error_of(settings(str(tmp_path / "empty")))
    assert str(tmp_path / "empty") in message and "train.txt or wiki.train.tokens" in message
    assert "train-split" not in message
    write_text_dir(tmp_path / "notest", splits=("train", "valid"))
    message = error_of(settings(str(tmp_path / "notest")))
    assert "test.txt or wiki.test.tokens" in message


@pytest.mark.parametrize("layout", ["txt", "tokens"])
def test_missing_train_with_valid_hints_train_split(tmp_path, layout):
    """Only valid and test present: the error says to set train-split='valid', which then works."""
    folder = write_text_dir(tmp_path / "vt", layout, splits=("valid", "test"))
    message = error_of(settings(folder))
    assert "train-split='valid'" in message and folder in message
    assert len(load_test_set(settings(folder, train_split="valid"))) > 0
    with pytest.raises(ValueError):
        td.corpus(settings(folder, train_split="test"))


# --------------------------------------------------------------------------- Hub path


def write_hub_copy(folder: Path, texts: dict[str, str]) -> str:
    """``Salesforce/wikitext``'s layout: ``<config>/<split>-00000-of-00001.parquet``, README configs.

    One row per line of the text in column ``text`` (as the Hub's), plus a decoy
    ``wikitext-2-v1`` config with other text that must not be read.
    """
    configs = {"wikitext-2-v1": {s: "decoy words only\n" for s in texts}, td.HUB_CONFIG: texts}
    yaml = ["---", "configs:"]
    for config, config_texts in configs.items():
        (folder / config).mkdir(parents=True, exist_ok=True)
        yaml += [f"- config_name: {config}", "  data_files:"]
        for split, text in config_texts.items():
            hub_split = td.HUB_SPLITS[split]
            rows = [line + "\n" for line in text.split("\n")[:-1]]
            features = datasets.Features({"text": datasets.Value("string")})
            table = datasets.Dataset.from_dict({"text": rows}, features=features)
            table.to_parquet(str(folder / config / f"{hub_split}-00000-of-00001.parquet"))
            yaml += [f"  - split: {hub_split}", f"    path: {config}/{hub_split}-*"]
    (folder / "README.md").write_text("\n".join(yaml + ["---", "", "# wikitext (test copy)", ""]))
    return str(folder)


def test_hub_path_on_local_copy_matches_txt_path(tmp_path, monkeypatch):
    """datasets.load_dataset(HUB_ID, HUB_CONFIG) on a Hub-layout copy gives the txt path's tokens."""
    monkeypatch.setattr(td, "HUB_ID", write_hub_copy(tmp_path / "hub", SPLIT_TEXT))
    monkeypatch.setattr(td, "HUB_CACHE_DIR", str(tmp_path / "hf-cache"))
    txt = write_text_dir(tmp_path / "txt")
    for train_split in ("train", "valid"):
        hub = td.corpus(settings("", train_split=train_split))
        local = td.corpus(settings(txt, train_split=train_split))
        assert hub.vocab == local.vocab
        assert np.array_equal(hub.train_ids, local.train_ids)
        assert np.array_equal(hub.train_articles, local.train_articles)
        assert np.array_equal(hub.test_ids, local.test_ids)
    s = settings("", partitioner="contiguous")
    assert all(np.array_equal(a, b) for a, b in zip(partition_indices(s, 3), partition_indices(settings(txt), 3)))


def test_unreachable_hub_is_one_line_error_naming_data_dir(offline_hub, monkeypatch, tmp_path):
    """No data-dir and no Hub (offline, nothing cached): one-line error that says to set data-dir."""
    monkeypatch.setattr(td, "HUB_CACHE_DIR", str(tmp_path / "hf-cache"))
    message = error_of(settings(""))
    assert td.HUB_ID in message and "data-dir" in message


# --------------------------------------------------------------------------- the real files


@pytest.mark.skipif(not (REAL_WIKITEXT / "valid.txt").is_file(), reason="no local WikiText-2 copy")
def test_real_wikitext2_valid_counts():
    """On the shipped WikiText-2 (tokenised; train_split='valid'): vocabulary and sequence counts, counted here."""
    s = DataSettings(dataset="wikitext-2", data_dir=str(REAL_WIKITEXT), train_split="valid", partitioner="contiguous")
    valid = (REAL_WIKITEXT / "valid.txt").read_text(encoding="utf-8")
    test = (REAL_WIKITEXT / "test.txt").read_text(encoding="utf-8")
    expected_vocab = len(set(valid.split()) | {"<unk>", "<eos>"})
    tokens = sum(len(line.split()) + 1 for line in valid.split("\n") if line.strip())
    test_tokens = sum(len(line.split()) + 1 for line in test.split("\n") if line.strip())
    assert model_kwargs(s) == {"vocab_size": expected_vocab, "max_len": 64}
    parts = partition_indices(s, 10)
    assert sum(len(p) for p in parts) == (tokens - 1) // 64
    assert len(load_test_set(s)) == (test_tokens - 1) // 64
    articles = sum(1 for line in valid.split("\n") if td.is_article_heading(line.split()))
    assert td.corpus(s).train_articles[-1] == articles - 1
    assert (expected_vocab, (tokens - 1) // 64, (test_tokens - 1) // 64) == (13777, 3380, 3814)
