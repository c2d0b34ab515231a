"""Summarise py-spy raw profiles (`py-spy record --format raw --threads [--gil | --idle]`) as text: each
thread's share of the samples and, per thread, the functions its samples end in (self) and pass through
(inclusive, our code and Ray's/asyncio's named by file).

    python benchmarks/pyspy_summary.py replica_gil.raw [replica_all.raw ...] > summary.txt

With --gil, a sample is taken only while some thread holds the GIL: the shares say who holds it.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^thread \((?P<tid>\w+)\): ?(?P<name>[^;]*);?(?P<stack>.*) (?P<count>\d+)$")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def thread_label(name: str) -> str:
    """Thread names without the numbers that differ between runs (Thread-12 (_run...) -> Thread (_run...))."""
    return re.sub(r"(Thread|ThreadPoolExecutor)-[\d_]+", r"\1", name).strip() or "(unnamed)"


def frame_key(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def read(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """thread label -> [(frames root first, samples)]"""
    out: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            frames = [f for f in m["stack"].split(";") if f]
            out[thread_label(m["name"])].append((frames, int(m["count"])))
    return out


def summarize(path: Path, top: int, shares: list[str] = ()) -> str:
    threads = read(path)
    total = sum(n for stacks in threads.values() for _, n in stacks)
    lines = [f"== {path.name}: {total} samples"]
    by_thread = sorted(threads.items(), key=lambda kv: -sum(n for _, n in kv[1]))
    for name, stacks in by_thread:
        samples = sum(n for _, n in stacks)
        if samples / total < 0.01:
            continue
        lines.append(f"-- {name}: {samples} samples, {100 * samples / total:.1f}% of all")
        leaf, inclusive = Counter(), Counter()
        for frames, n in stacks:
            if frames:
                leaf[frame_key(frames[-1])] += n
            for key in {frame_key(f) for f in frames}:
                inclusive[key] += n
        lines.append("   self:      " + "; ".join(f"{k} {100 * v / samples:.0f}%" for k, v in leaf.most_common(top)))
        lines.append("   inclusive: " + "; ".join(f"{k} {100 * v / samples:.0f}%" for k, v in
                                                 inclusive.most_common(top + 6)[6:]))
        if shares:  # samples whose stack passes through a frame naming each function (the first one named wins)
            counts = Counter()
            for frames, n in stacks:
                keys = [frame_key(f) for f in frames]
                counts[next((s for s in shares if any(s in k for k in keys)), "other")] += n
            lines.append("   shares:    " + "; ".join(f"{k} {100 * counts[k] / samples:.0f}%" for k in
                                                      [*shares, "other"] if counts[k]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path, nargs="+")
    ap.add_argument("--top", type=int, default=8, help="functions listed per thread")
    ap.add_argument("--share", action="append", default=[], metavar="FUNC",
                    help="per thread, the share of samples passing through a frame whose name contains FUNC "
                         "(repeatable; a sample counts for the first FUNC it matches)")
    a = ap.parse_args()
    print("\n\n".join(summarize(p, a.top, a.share) for p in a.raw))


if __name__ == "__main__":
    main()
