"""A checkpoint directory of a benchmark shape without weights, for `load_format: dummy`.

It holds the shape's config.json (vocabulary sized to the tokenizer, so every sampled id
decodes), the tokenizer files and generation_config.json copied from a real model
directory. The served app then runs the shape's arithmetic on random weights:

    python benchmarks/dummy_checkpoint.py --shape llama3-8b --tokenizer DIR --out /tmp/llama3-8b-shape
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(C.SHAPES))
    p.add_argument("--tokenizer", type=Path, required=True, help="a model directory with tokenizer files")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from transformers import AutoTokenizer

    a.out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (a.tokenizer / name).is_file():
            shutil.copy(a.tokenizer / name, a.out / name)
    vocab = len(AutoTokenizer.from_pretrained(str(a.tokenizer)))
    config = {**C.SHAPES[a.shape], "vocab_size": vocab}
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{a.out}: {a.shape} shape, vocabulary {vocab} (the tokenizer's)")


if __name__ == "__main__":
    main()
