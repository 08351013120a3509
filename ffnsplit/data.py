"""Calibration and evaluation text: named corpora from installed packages, or the user's files.

Named corpora come from gensim's test data, so nothing is downloaded:
- `wiki-calib` / `wiki-eval`: a shortened 2016 English Wikipedia dump, cleaned to prose and split by
  article (a hash of the title) so calibration never sees evaluation text;
- `lee-news`: Lee's background news corpus (one article per line);
- `polarity`: 200 movie-review sentences labelled positive / negative (see `polarity_examples`);
- `lee_similarity()`: 50 news documents with human pairwise similarity ratings (not a corpus).

User text: a `.txt` file (one document), a `.jsonl` file (one document per line, in a "text"
field) or a folder of those (searched recursively, in sorted order).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ffnsplit.errors import CorpusError, OptionError
from ffnsplit.fsutil import atomic_write_text

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning rules change: the cached cleaned text is keyed by it.
WIKI_CLEANING_VERSION = 2
# One article in WIKI_EVAL_SHARE goes to wiki-eval (by title hash), the rest to wiki-calib.
WIKI_EVAL_SHARE = 4
_MIN_PARAGRAPH_WORDS = 8
_MIN_ARTICLE_WORDS = 100
# Sections after which an article holds only citations and links.
_TAIL_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "footnotes",
        "citations",
        "notes and references",
    }
)


@dataclass(frozen=True)
class Corpus:
    """A list of documents; `checksum` (sha256 of the texts) identifies it in profile headers."""

    name: str
    texts: list[str]
    checksum: str


def _checksum(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _make_corpus(name: str, texts: list[str]) -> Corpus:
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise CorpusError(f"corpus {name} holds no text: give a file or folder with some text")
    return Corpus(name=name, texts=texts, checksum=_checksum(texts))


def _gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath

    path = Path(datapath(name))
    if not path.is_file():
        raise CorpusError(
            f"gensim's test data file {name} is missing: reinstall it with "
            "`pip install --force-reinstall gensim`"
        )
    return path


def _gensim_lines(name: str, encoding: str = "utf-8") -> list[str]:
    return _gensim_file(name).read_text(encoding=encoding).splitlines()


# ---------------------------------------------------------------- Wikipedia


def _clean_paragraph(line: str) -> str:
    line = line.replace("\xa0", " ")
    line = re.sub(r"'{2,}", "", line)  # bold / italic quotes
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
    line = re.sub(r"\s+([,.;:])", r"\1", line)
    return re.sub(r"\s{2,}", " ", line).strip()


def clean_wiki_article(markup: str) -> str:
    """Wiki markup -> prose paragraphs joined by newlines ("" for redirects).

    Keeps sentences only: drops headings, lists, tables, captions without a full stop, short
    fragments and everything from the references / external links sections on.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    if markup.lstrip().lower().startswith("#redirect"):
        return ""
    paragraphs = []
    for raw in filter_wiki(markup).splitlines():
        line = raw.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if heading:
            if heading[2].strip().lower() in _TAIL_SECTIONS:
                break
            continue
        line = _clean_paragraph(line)
        if (
            len(line.split()) < _MIN_PARAGRAPH_WORDS
            or line[0] in "*#:;|!{}<"  # lists, definitions, tables, leftover tags
            or line[-1] not in ".!?\"')"
        ):
            continue
        paragraphs.append(line)
    return "\n".join(paragraphs)


def _parse_wiki(dump: Path) -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(dump, "rb") as handle:
        for title, markup, _ in extract_pages(handle, filter_namespaces=("0",)):
            text = clean_wiki_article(markup)
            if len(text.split()) >= _MIN_ARTICLE_WORDS:
                articles.append((title, text))
    return articles


def wiki_articles() -> list[tuple[str, str]]:
    """(title, prose) of every kept article of the dump, in dump order.

    Parsing takes a few seconds, so the result is cached (atomically) under the ffnsplit cache,
    keyed by the dump's checksum and the cleaning version.
    """
    from ffnsplit.models import cache_root

    dump = _gensim_file(WIKI_DUMP)
    dump_hash = hashlib.sha256(dump.read_bytes()).hexdigest()[:16]
    cached = cache_root() / "corpora" / f"wiki-v{WIKI_CLEANING_VERSION}-{dump_hash}.json"
    if cached.is_file():
        try:
            return [(title, text) for title, text in json.loads(cached.read_text("utf-8"))]
        except (ValueError, TypeError):
            pass  # a damaged cache file is rebuilt below
    articles = _parse_wiki(dump)
    atomic_write_text(cached, json.dumps(articles, ensure_ascii=False))
    return articles


def is_wiki_eval_title(title: str) -> bool:
    """The split rule: an article belongs to wiki-eval iff its title hash says so."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % WIKI_EVAL_SHARE == 0


def _wiki(evaluation: bool) -> list[str]:
    return [text for title, text in wiki_articles() if is_wiki_eval_title(title) == evaluation]


# ---------------------------------------------------------------- other named text


def _lee_news() -> list[str]:
    return _gensim_lines("lee_background.cor")


def polarity_examples() -> list[tuple[str, int]]:
    """The 200 labelled movie-review sentences: (sentence, 1 positive / 0 negative)."""
    examples = []
    for number, line in enumerate(_gensim_lines("pang_lee_polarity.cor", "cp1252"), 1):
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        if label not in ("__label__pos", "__label__neg") or not text.strip():
            raise CorpusError(f"pang_lee_polarity.cor line {number} has no __label__ prefix")
        examples.append((text.strip(), int(label == "__label__pos")))
    return examples


def _polarity() -> list[str]:
    return [text for text, _ in polarity_examples()]


def lee_similarity() -> tuple[list[str], list[tuple[int, int, float]]]:
    """Lee's 50 news documents and the human similarity rating (0-1) of every pair i < j."""
    documents = [line.strip() for line in _gensim_lines("lee.cor", "cp1252") if line.strip()]
    rows = [line.split() for line in _gensim_lines("similarities0-1.txt") if line.strip()]
    n = len(documents)
    if len(rows) != n or any(len(row) != n for row in rows):
        raise CorpusError(
            f"lee.cor has {n} documents but similarities0-1.txt is not a {n}x{n} matrix: "
            "reinstall gensim"
        )
    pairs = [(i, j, float(rows[i][j])) for i in range(n) for j in range(i + 1, n)]
    return documents, pairs


NAMED_CORPORA: dict[str, Callable[[], list[str]]] = {
    "wiki-calib": lambda: _wiki(evaluation=False),
    "wiki-eval": lambda: _wiki(evaluation=True),
    "lee-news": _lee_news,
    "polarity": _polarity,
}


def list_corpora() -> list[str]:
    """Names accepted by `load_corpus` besides file and folder paths."""
    return list(NAMED_CORPORA)


# ---------------------------------------------------------------- user files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8"
        ) from exc


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CorpusError(f"{path} line {number} is not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'{path} line {number} has no string "text" field')
        texts.append(record["text"])
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    if path.suffix == ".txt":
        return [_read_text(path)]
    raise CorpusError(f"{path} is neither a .txt nor a .jsonl file: give text in one of those")


def load_corpus(name_or_path: str | Path) -> Corpus:
    """A named corpus (see `list_corpora`), or a user .txt / .jsonl file or folder of them."""
    name = str(name_or_path)
    if name in NAMED_CORPORA:
        return _make_corpus(name, NAMED_CORPORA[name]())
    path = Path(name).expanduser()
    if not path.exists():
        raise CorpusError(
            f"no corpus {name!r}: not a named corpus ({', '.join(NAMED_CORPORA)}) nor an existing "
            "file or folder"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise CorpusError(f"folder {path} holds no .txt or .jsonl files: add some text")
        texts = [text for file in files for text in _file_texts(file)]
    else:
        texts = _file_texts(path)
    return _make_corpus(name, texts)


# ---------------------------------------------------------------- token blocks


def count_tokens(tokenizer, corpus: Corpus) -> int:
    """Tokens in the corpus's documents (no special tokens), e.g. to report corpus sizes."""
    return sum(len(ids) for ids in _tokenize(tokenizer, corpus.texts))


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def token_blocks(
    tokenizer,
    corpus: Corpus,
    n_tokens: int,
    seq_len: int,
    seed: int = 0,
    add_bos: bool = True,
) -> torch.Tensor:
    """ceil(n_tokens / seq_len) blocks of seq_len tokens: LongTensor [n_blocks, seq_len].

    The documents are tokenized and joined (with EOS, else SEP, between them) into one stream cut
    into consecutive blocks; each block starts with BOS when the tokenizer has one and `add_bos`.
    Blocks are drawn by a permutation seeded with `seed`, so the same arguments give the same
    blocks, and asking for more tokens gives a superset of the blocks of fewer.
    """
    if n_tokens < 1:
        raise OptionError(f"--tokens must be at least 1 (got {n_tokens})")
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2 (got {seq_len})")
    bos = tokenizer.bos_token_id if add_bos else None
    separator = tokenizer.eos_token_id
    if separator is None:
        separator = tokenizer.sep_token_id
    stream: list[int] = []
    for index, ids in enumerate(_tokenize(tokenizer, corpus.texts)):
        if index and separator is not None:
            stream.append(separator)
        stream.extend(ids)
    body = seq_len - 1 if bos is not None else seq_len
    available = len(stream) // body
    needed = math.ceil(n_tokens / seq_len)
    if available < needed:
        raise CorpusError(
            f"corpus {corpus.name} has {len(stream):,} tokens with this tokenizer, fewer than "
            f"--tokens {n_tokens:,} needs in blocks of {seq_len}: lower --tokens or add text"
        )
    blocks = torch.tensor(stream[: available * body], dtype=torch.long).view(available, body)
    generator = torch.Generator().manual_seed(seed)
    chosen = blocks[torch.randperm(available, generator=generator)[:needed]]
    if bos is not None:
        chosen = torch.cat([torch.full((needed, 1), bos, dtype=torch.long), chosen], dim=1)
    return chosen
