"""Corpora: named text from gensim, user files, and deterministic token blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ffnsplit import data
from ffnsplit.errors import CorpusError, OptionError
from ffnsplit.models import cache_root


def word_tokenizer(texts: list[str], bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `texts`: one token per word, ids from 3 on."""
    words = sorted({word for text in texts for word in text.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {word: i + 3 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", **specials
    )


@pytest.fixture(scope="module")
def wiki(cache_dir: str) -> tuple[data.Corpus, data.Corpus]:
    return data.load_corpus("wiki-calib"), data.load_corpus("wiki-eval")


def test_named_corpora_have_expected_sizes(wiki: tuple[data.Corpus, data.Corpus]) -> None:
    assert data.list_corpora() == ["wiki-calib", "wiki-eval", "lee-news", "polarity"]
    calib, evaluation = wiki
    words = {c.name: sum(len(t.split()) for t in c.texts) for c in wiki}
    # ~390k words of prose in ~100 articles, about a sixth of the words held out for evaluation.
    assert 250_000 < words["wiki-calib"] < 400_000 and len(calib.texts) > 60
    assert 40_000 < words["wiki-eval"] < 120_000 and len(evaluation.texts) > 10
    news = data.load_corpus("lee-news")
    assert len(news.texts) == 300 and 50_000 < sum(len(t.split()) for t in news.texts) < 70_000
    assert len(data.load_corpus("polarity").texts) == 200


def test_wiki_eval_is_disjoint_from_wiki_calib(wiki: tuple[data.Corpus, data.Corpus]) -> None:
    calib, evaluation = wiki
    calib_paragraphs = {p for text in calib.texts for p in text.splitlines()}
    eval_paragraphs = {p for text in evaluation.texts for p in text.splitlines()}
    assert not set(calib.texts) & set(evaluation.texts)
    # Not even a paragraph is shared (no boilerplate sentence leaks either way).
    assert not calib_paragraphs & eval_paragraphs
    titles = [title for title, _ in data.wiki_articles()]
    eval_titles = [t for t in titles if data.is_wiki_eval_title(t)]
    assert len(eval_titles) == len(evaluation.texts)
    assert len(titles) - len(eval_titles) == len(calib.texts)


def test_wiki_text_is_clean_prose(wiki: tuple[data.Corpus, data.Corpus]) -> None:
    for corpus in wiki:
        for text in corpus.texts:
            for paragraph in text.splitlines():
                assert paragraph == paragraph.strip() and paragraph
                assert paragraph[0] not in "*#:;|!{=<"
                for markup in ("[[", "]]", "{{", "}}", "''", "==", "<ref", "\xa0"):
                    assert markup not in paragraph, (markup, paragraph[:200])


def test_clean_wiki_article_rules() -> None:
    markup = (
        "'''Foo''' is a [[bar|thing]] that was made in 1900 by a person of some note.\n"
        "== History ==\n"
        "* a list item that is long enough to be a sentence but is a list.\n"
        "{| class=wikitable\n| cell one of a table row || cell two of a table row.\n|}\n"
        "Too short.\n"
        "The second paragraph of the article explains ''more'' about the thing itself.\n"
        "== References ==\n"
        "A sentence under references that holds only a citation, never prose to keep.\n"
    )
    assert data.clean_wiki_article(markup) == (
        "Foo is a thing that was made in 1900 by a person of some note.\n"
        "The second paragraph of the article explains more about the thing itself."
    )
    assert data.clean_wiki_article("#REDIRECT [[Somewhere else]]") == ""


def test_wiki_cache_is_reused_and_rebuilt_when_damaged(cache_dir: str, monkeypatch) -> None:
    articles = data.wiki_articles()
    (cached,) = (cache_root() / "corpora").glob("wiki-v*.json")
    original = cached.read_bytes()
    assert json.loads(original) == [list(a) for a in articles]
    # A valid cache is read, not rebuilt.
    monkeypatch.setattr(data, "_parse_wiki", lambda dump: [("Rebuilt", "rebuilt text")])
    assert data.wiki_articles() == articles
    try:
        cached.write_text("{not json", "utf-8")
        assert data.wiki_articles() == [("Rebuilt", "rebuilt text")]
        assert json.loads(cached.read_text("utf-8")) == [["Rebuilt", "rebuilt text"]]
    finally:
        cached.write_bytes(original)


def test_polarity_examples_are_labelled_sentences() -> None:
    examples = data.polarity_examples()
    assert len(examples) == 200
    assert sorted({label for _, label in examples}) == [0, 1]
    assert sum(label for _, label in examples) == 100
    assert all(text and not text.startswith("__label__") for text, _ in examples)
    assert any("clichés" in text for text, _ in examples)  # cp1252 decoded, not mangled


def test_lee_similarity_pairs() -> None:
    documents, pairs = data.lee_similarity()
    assert len(documents) == 50 and all(len(d.split()) > 20 for d in documents)
    assert len(pairs) == 50 * 49 // 2
    assert all(0 <= i < j < 50 and 0.0 <= score <= 1.0 for i, j, score in pairs)
    assert len({score for _, _, score in pairs}) > 20
    assert any("£" in d for d in documents)


def test_user_files_and_folders(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n", "utf-8")
    lines = [json.dumps({"text": "second doc"}), "", json.dumps({"text": "third", "id": 3})]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(lines), "utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", "utf-8")
    single = data.load_corpus(tmp_path / "a.txt")
    assert single.texts == ["first document\nwith two lines\n"]
    folder = data.load_corpus(str(tmp_path))
    assert folder.texts == ["first document\nwith two lines\n", "second doc", "third"]
    assert folder.name == str(tmp_path)
    assert data.load_corpus(str(tmp_path)).checksum == folder.checksum
    assert folder.checksum != single.checksum


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", " \n\n", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\n{broken\n', "line 2 is not valid JSON"),
        ("field.jsonl", '{"body": "no text field"}\n', 'line 1 has no string "text" field'),
        ("latin.txt", b"caf\xe9 au lait", "not UTF-8"),
        ("table.csv", "a,b\n", "neither a .txt nor a .jsonl"),
    ],
)
def test_bad_user_files(tmp_path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, "utf-8")
    with pytest.raises(CorpusError, match=message) as info:
        data.load_corpus(path)
    assert "\n" not in str(info.value)


def test_missing_and_unknown_corpora(tmp_path) -> None:
    with pytest.raises(CorpusError, match="wiki-calib, wiki-eval, lee-news, polarity"):
        data.load_corpus("wiki-valid")
    with pytest.raises(CorpusError, match="not a named corpus"):
        data.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no .txt or .jsonl files"):
        data.load_corpus(tmp_path / "empty")


def _toy_corpus() -> data.Corpus:
    texts = [" ".join(f"w{d}_{i}" for i in range(37 + 11 * d)) for d in range(6)]
    return data._make_corpus("toy", texts)


def test_token_blocks_shape_bos_and_determinism() -> None:
    corpus = _toy_corpus()
    tokenizer = word_tokenizer(corpus.texts)
    blocks = data.token_blocks(tokenizer, corpus, n_tokens=100, seq_len=16, seed=3)
    assert blocks.dtype == torch.long and blocks.shape == (math.ceil(100 / 16), 16)
    assert (blocks[:, 0] == tokenizer.bos_token_id).all()
    assert (blocks[:, 1:] != tokenizer.bos_token_id).all()
    assert torch.equal(blocks, data.token_blocks(tokenizer, corpus, 100, 16, seed=3))
    assert not torch.equal(blocks, data.token_blocks(tokenizer, corpus, 100, 16, seed=4))
    # More tokens with the same seed: the same blocks first, then more.
    more = data.token_blocks(tokenizer, corpus, 200, 16, seed=3)
    assert torch.equal(more[: len(blocks)], blocks)


def test_token_blocks_are_slices_of_the_document_stream() -> None:
    corpus = _toy_corpus()
    tokenizer = word_tokenizer(corpus.texts)
    stream = []
    for index, text in enumerate(corpus.texts):
        stream += ([tokenizer.eos_token_id] if index else []) + tokenizer.encode(text)
    n_blocks = len(stream) // 12
    blocks = data.token_blocks(tokenizer, corpus, n_blocks * 12, 12, add_bos=False)
    assert blocks.shape == (n_blocks, 12)
    starts = sorted(stream.index(row[0]) for row in blocks.tolist())
    assert starts == list(range(0, n_blocks * 12, 12))
    for row in blocks.tolist():
        start = stream.index(row[0])
        assert row == stream[start : start + 12]
    assert (blocks == tokenizer.eos_token_id).sum() == len(corpus.texts) - 1


def test_token_blocks_without_bos_token() -> None:
    corpus = _toy_corpus()
    tokenizer = word_tokenizer(corpus.texts, bos=False)
    blocks = data.token_blocks(tokenizer, corpus, 64, 16)
    assert blocks.shape == (4, 16) and (blocks != 1).all()


def test_token_blocks_too_few_tokens_and_bad_options() -> None:
    corpus = _toy_corpus()
    tokenizer = word_tokenizer(corpus.texts)
    assert data.count_tokens(tokenizer, corpus) == sum(len(t.split()) for t in corpus.texts)
    total = data.count_tokens(tokenizer, corpus) + len(corpus.texts) - 1  # EOS between documents
    with pytest.raises(CorpusError, match=f"corpus toy has {total:,} tokens .* --tokens 10,000"):
        data.token_blocks(tokenizer, corpus, 10_000, 16)
    with pytest.raises(OptionError, match="--tokens"):
        data.token_blocks(tokenizer, corpus, 0, 16)
    with pytest.raises(OptionError, match="--seq-len"):
        data.token_blocks(tokenizer, corpus, 16, 1)
