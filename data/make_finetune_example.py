"""A small labelled data set from the bundled corpus, for the README's fine-tuning example: which play is a
speech from? Writes train.csv and val.csv (columns text, label) into --out_dir.

    python data/make_finetune_example.py [--plays HAMLET MACBETH "ROMEO AND JULIET"] [--out_dir /tmp/ft]

A speech is a block of lines under a speaker's name (the name itself is left out: it would give the play
away); speeches of fewer than --min_words words are skipped. Each play contributes the same number of
speeches, so always guessing one play scores 1 / number of plays.
"""

import argparse
import csv
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "shakespeare.txt"
BYLINE = "by William Shakespeare"


def plays(text: str) -> dict[str, str]:
    """Title -> text of each play; a play starts with its title, a blank line and the byline."""
    lines = text.split("\n")
    starts = [i - 2 for i, line in enumerate(lines) if line == BYLINE]
    ends = starts[1:] + [len(lines)]
    return {lines[s]: "\n".join(lines[s:e]) for s, e in zip(starts, ends, strict=True)}


def speeches(play: str, min_words: int) -> list[str]:
    """Each block of lines under a speaker line (a short line ending in '.'), joined into one line."""
    found = []
    for block in play.split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) < 2 or len(lines[0]) > 30 or not lines[0].endswith("."):
            continue
        speech = " ".join(lines[1:])
        if len(speech.split()) >= min_words:
            found.append(speech)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plays", nargs="+", default=["HAMLET, PRINCE OF DENMARK", "MACBETH", "ROMEO AND JULIET"],
                   help="play titles as in the corpus (default: %(default)s)")
    p.add_argument("--per_play", type=int, default=400, help="speeches per play (default %(default)s)")
    p.add_argument("--min_words", type=int, default=8, help="shortest speech kept, in words")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of each play's speeches for val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=".", help="where train.csv and val.csv go")
    args = p.parse_args()
    by_title = plays(CORPUS.read_text(encoding="utf-8"))
    rng = random.Random(args.seed)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for title in args.plays:
        if title not in by_title:
            p.error(f"no play titled {title!r}; the titles are: {', '.join(by_title)}")
        chosen = rng.sample(speeches(by_title[title], args.min_words), args.per_play)
        n_val = round(args.val_fraction * len(chosen))
        label = title.split(",")[0].title()
        rows["val"] += [(s, label) for s in chosen[:n_val]]
        rows["train"] += [(s, label) for s in chosen[n_val:]]
    for split, split_rows in rows.items():
        rng.shuffle(split_rows)
        path = Path(args.out_dir) / f"{split}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:  # a maintainer's script, run without gptlab
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(split_rows)
        print(f"{path}: {len(split_rows)} speeches")


if __name__ == "__main__":
    main()
