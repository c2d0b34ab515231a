"""Build the free-text corpus for the reference model: Debian documentation packages, split by document.

Sources (all free, fetched with `apt-get download` from the machine's Debian mirror and
unpacked with `dpkg-deb -x` into a temporary folder, never installed):

- `bible-kjv-text` + `bible-kjv`: the King James Bible (the package's own `bible` program
  decodes its data file); one document per book.
- `python3.X-doc`: the Python documentation sources (`_sources/**/*.rst.txt`).
- `linux-doc-X`: the Linux kernel documentation sources (`_sources/**/*.rst.txt`).
- `perl-doc`: the Perl manual (`*.pod`, `*.pod.gz`).

Split: a document is held out when sha1(source/name) mod 100 < `heldout_percent`; nothing
of a held-out document is trained on. Then a byte-level BPE tokenizer (`tokenizers`, vocab
4096 by default, the same special tokens and chat template as the embedded tiny model) is
trained on the training documents only, and both splits are tokenised.

Output folder (default `.corpus/`, ignored by git):
  train.bin      uint16 token ids of the training documents, separated by blank lines
  heldout.txt    the held-out documents as one text stream (what `swiftserve eval ppl` reads)
  heldout.bin    its token ids
  tokenizer/     Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...)
  manifest.json  package versions and sha256, document and token counts, split rule

    python -m benchmarks.corpus --out .corpus
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {  # source name -> apt package patterns (first that apt knows wins)
    "bible": ["bible-kjv-text", "bible-kjv"],
    "python-doc": ["python3-doc"],
    "linux-doc": ["linux-doc"],
    "perl-doc": ["perl-doc"],
}
DOC_SEPARATOR = "\n\n\n"

BOOKS = dict(zip(  # the `bible` program's abbreviations -> book names, in canonical order
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam "
    "Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal "
    "Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    ("Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|"
     "1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|"
     "Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|Haggai|"
     "Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|1 Corinthians|2 Corinthians|Galatians|Ephesians|"
     "Philippians|Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|2 Timothy|Titus|Philemon|Hebrews|James|"
     "1 Peter|2 Peter|1 John|2 John|3 John|Jude|Revelation").split("|")))
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# ---- fetching -------------------------------------------------------------
def resolve_package(name: str) -> str:
    """Follow a metapackage (python3-doc -> python3.11-doc, linux-doc -> linux-doc-6.1) to its content."""
    out = subprocess.run(["apt-cache", "depends", name], capture_output=True, text=True, check=True).stdout
    deps = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith("Depends:")]
    same_family = [d for d in deps if d.startswith(name.split("-")[0]) and "<" not in d]
    return same_family[0] if name in ("python3-doc", "linux-doc") and same_family else name


def download(packages: list[str], workdir: Path) -> dict[str, dict]:
    """apt-get download + dpkg-deb -x each package into workdir/<package>; returns versions and hashes."""
    info = {}
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        real = resolve_package(pkg)
        subprocess.run(["apt-get", "download", real], cwd=debs, check=True, capture_output=True)
        deb = max(debs.glob(f"{real}_*.deb"))
        target = workdir / real
        target.mkdir(exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        info[pkg] = {"package": real, "deb": deb.name,
                     "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    return info


# ---- documents ------------------------------------------------------------
def bible_documents(root: Path) -> dict[str, str]:
    """One document per book: the book's name, then per chapter a heading and numbered verses."""
    program = next(root.glob("bible-kjv/usr/bin/bible"))
    data = next(root.glob("bible-kjv-text/usr/lib/bible.data"))
    out = subprocess.run([str(program), "-f", "-p", str(data.parent), "-d", data.name, "gen1:1-rev22:21"],
                         capture_output=True, text=True, check=True).stdout  # -d takes a name on the -p path
    return format_bible(out)


def format_bible(raw: str) -> dict[str, str]:
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, str] = {}
    for line in raw.splitlines():
        m = _VERSE.match(line.strip())
        if not m:
            continue
        abbr, chapter, verse, text = m.groups()
        name = BOOKS.get(abbr, abbr)
        lines = books.setdefault(name, [name.upper()])
        if chapter_of.get(name) != chapter:
            chapter_of[name] = chapter
            lines.append(f"\n{name} {chapter}\n")
        lines.append(f"{verse} {text}")
    return {f"bible/{name}": "\n".join(lines) + "\n" for name, lines in books.items()}


def text_files(root: Path, source: str, patterns: list[str], strip_prefix: str) -> dict[str, str]:
    docs = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            name = str(path.relative_to(root))
            name = name[name.find(strip_prefix) + len(strip_prefix):] if strip_prefix in name else name
            docs[f"{source}/{name}"] = raw.decode("utf-8", errors="replace")
    return docs


def clean(text: str) -> str:
    """Unix newlines, no trailing spaces, at most two blank lines in a row, no control characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def collect_documents(root: Path) -> dict[str, str]:
    docs = bible_documents(root)
    docs.update(text_files(root, "python-doc", ["python3*-doc/usr/share/doc/python3*/html/_sources/**/*.rst.txt"],
                           "_sources/"))
    docs.update(text_files(root, "linux-doc", ["linux-doc-*/usr/share/doc/linux-doc-*/html/_sources/**/*.rst.txt"],
                           "_sources/"))
    docs.update(text_files(root, "perl-doc", ["perl-doc/usr/share/perl/*/pod/*.pod",
                                              "perl-doc/usr/share/doc/perl/*.pod.gz"], "perl-doc/"))
    docs = {k: clean(v) for k, v in docs.items()}
    return {k: v for k, v in docs.items() if len(v) >= 200}


def is_heldout(name: str, percent: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < percent


# ---- tokenizer --------------------------------------------------------------
def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation), the tiny model's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from swift_engine.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE)


def encode_all(hf_tok, docs: list[str]):
    import numpy as np

    ids: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        for enc in hf_tok(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    return np.asarray(ids, dtype=np.uint16)


def build(out: Path, vocab_size: int = 4096, heldout_percent: int = 3, workdir: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swiftserve-corpus-")) if workdir is None else workdir
    try:
        packages = download([p for pats in PACKAGES.values() for p in pats], tmp)
        docs = collect_documents(tmp)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    names = sorted(docs)
    train = [n for n in names if not is_heldout(n, heldout_percent)]
    held = [n for n in names if is_heldout(n, heldout_percent)]
    train_texts = [docs[n] + DOC_SEPARATOR for n in train]
    held_text = DOC_SEPARATOR.join(docs[n] for n in held)
    hf_tok = train_tokenizer(train_texts, vocab_size)
    hf_tok.save_pretrained(str(out / "tokenizer"))
    train_ids = encode_all(hf_tok, train_texts)
    held_ids = encode_all(hf_tok, [held_text])
    train_ids.tofile(out / "train.bin")
    held_ids.tofile(out / "heldout.bin")
    (out / "heldout.txt").write_text(held_text)
    by_source: dict[str, dict] = {}
    for n in names:
        s = by_source.setdefault(n.split("/")[0], {"documents": 0, "heldout_documents": 0, "chars": 0})
        s["documents"] += 1
        s["heldout_documents"] += int(n in set(held))
        s["chars"] += len(docs[n])
    manifest = {
        "packages": packages, "sources": by_source, "vocab_size": len(hf_tok),
        "split": f"document held out iff int(sha1(name), 16) % 100 < {heldout_percent}",
        "train_documents": len(train), "heldout_documents": len(held),
        "train_tokens": int(train_ids.size), "heldout_tokens": int(held_ids.size),
        "train_chars": sum(len(t) for t in train_texts), "heldout_chars": len(held_text),
        "heldout_names": held, "dtype": "uint16",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".corpus"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--heldout-percent", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep the downloaded packages here (default: a temp dir)")
    args = ap.parse_args(argv)
    m = build(args.out, args.vocab_size, args.heldout_percent, args.workdir)
    print(json.dumps({k: v for k, v in m.items() if k != "heldout_names"}, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
