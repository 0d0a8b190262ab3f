"""BLiMP (Warstadt et al. 2020, TACL 8: 377-392): 67 paradigms of 1,000 minimal pairs of English sentences, one
grammatical and one not. A model is right on a pair when it gives the good sentence the higher total
log-probability; a paradigm's score is its fraction of pairs right, and the benchmark's the mean over paradigms.

A sentence's score is the sum of its tokens' log-probabilities after <|endoftext|>, as lm-eval's `blimp` task
computes it (an empty context, so the end-of-text token stands before the sentence, and the task's target
delimiter, one space, before the sentence's text). A tie counts as wrong: lm-eval's argmax would count it right,
and a model that scores every sentence alike would look perfect. A sentence longer than the model's block_size
is scored with a window sliding one token at a time, so every token sees the block_size tokens before it.

The data: one JSONL file per paradigm (sentence_good, sentence_bad, field, UID, ...) from the BLiMP authors'
repository (alexwarstadt/blimp, folder data/) or the Hugging Face dataset nyu-mll/blimp. CC BY 4.0.
"""

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt import GPT
from gptlab import stats
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint
from gptlab.errors import UsageError
from gptlab.fileio import atomic_write_text
from gptlab.runtime import local_runtime
from gptlab.tokenizer import Tokenizer

FIELDS = ("morphology", "syntax", "semantics", "syntax_semantics")
RECORD_KEYS = ("sentence_good", "sentence_bad", "field", "UID")
SUMMARY_FILE = "models_summary.jsonl"  # the paper's scores, beside the paradigms in some copies: not a paradigm
DELIMITER = " "  # lm-eval's target_delimiter, which its blimp task puts before each sentence


@dataclass(frozen=True)
class Paradigm:
    uid: str
    field: str
    pairs: list[tuple[str, str]]  # (good, bad)


@dataclass(frozen=True)
class ParadigmScore:
    uid: str
    field: str
    pairs: int
    correct: int
    loglikelihoods: list[tuple[float, float]]  # per pair: (good, bad)

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs


# ----------------------------------------------------------------------------- the data

def paradigm_files(folder: str | Path) -> list[Path]:
    """The folder's paradigm files (every .jsonl but the paper's summary), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"BLiMP folder not found: {folder} (get the paradigms' .jsonl files from the BLiMP "
                         f"repository, alexwarstadt/blimp, folder data/)")
    files = sorted(p for p in folder.glob("*.jsonl") if p.name != SUMMARY_FILE)
    if not files:
        raise UsageError(f"{folder} holds no BLiMP paradigm files (*.jsonl)")
    return files


def read_paradigm(path: Path) -> Paradigm:
    """One paradigm file, every line checked: a damaged file is one error naming its line."""
    pairs, uid, field = [], None, None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line, f"{path}:{number}")
        if uid is not None and (record["UID"], record["field"].replace("/", "_")) != (uid, field):
            raise UsageError(f"{path}:{number}: UID/field {record['UID']}/{record['field']} differ from the "
                             f"file's first pair ({uid}/{field}): one paradigm per file")
        uid, field = record["UID"], record["field"].replace("/", "_")  # principle_A_case_2 says syntax/semantics
        pairs.append((record["sentence_good"], record["sentence_bad"]))
    if not pairs:
        raise UsageError(f"{path} holds no pairs")
    return Paradigm(uid, field, pairs)


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        raise UsageError(f"{where}: not a JSON record") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k] for k in RECORD_KEYS):
        raise UsageError(f"{where}: a BLiMP record needs the text fields {', '.join(RECORD_KEYS)}")
    return record


def read_paradigms(folder: str | Path) -> list[Paradigm]:
    paradigms = [read_paradigm(path) for path in paradigm_files(folder)]
    twice = sorted(uid for uid, n in Counter(p.uid for p in paradigms).items() if n > 1)
    if twice:
        raise UsageError(f"{folder}: paradigm(s) {', '.join(twice)} in more than one file")
    return paradigms


# ----------------------------------------------------------------------------- scoring

def sentence_tokens(tokenizer: Tokenizer, sentences: list[str]) -> list[list[int]]:
    """Per sentence: <|endoftext|> then the sentence's tokens; the first is context, the rest are scored."""
    return [[tokenizer.eot_id, *ids] for ids in tokenizer.encode_batch([DELIMITER + s for s in sentences])]


def windows(tokens: list[int], block_size: int) -> Iterator[tuple[list[int], int]]:
    """(window, first scored target) pairs that together predict every token after the first exactly once,
    each from up to block_size tokens before it: the first window whole, then one window per further token,
    slid by one, that scores only its last target."""
    yield tokens[:block_size + 1], 0
    for end in range(block_size + 1, len(tokens)):
        yield tokens[end - block_size:end + 1], block_size - 1


@torch.no_grad()
def sentence_loglikelihoods(model: GPT, sequences: list[list[int]], batch_size: int = 64,
                            progress: bool = False) -> list[float]:
    """Sum of log P(token | the tokens before it) over each sequence's tokens after its first, in batches of
    windows of similar length (padded on the right: a causal model's earlier positions never see the pad)."""
    device = next(model.parameters()).device
    parts = [(i, window, first) for i, seq in enumerate(sequences)
             for window, first in windows(seq, model.config.block_size)]
    parts.sort(key=lambda part: len(part[1]))
    totals = [0.0] * len(sequences)
    batches = [parts[i:i + batch_size] for i in range(0, len(parts), batch_size)]
    for batch in tqdm(batches, desc="BLiMP", unit="batch", disable=None if progress else True):
        width = max(len(window) for _, window, _ in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, window, _) in enumerate(batch):
            tokens[row, :len(window)] = torch.tensor(window)
        tokens = tokens.to(device)
        logits, _ = model(tokens[:, :-1])
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(2, tokens[:, 1:, None])[..., 0].double().cpu()
        for row, (i, window, first) in enumerate(batch):
            totals[i] += logprobs[row, first:len(window) - 1].sum().item()
    return totals


def score_paradigms(model: GPT, tokenizer: Tokenizer, paradigms: list[Paradigm], batch_size: int = 64,
                    progress: bool = False) -> list[ParadigmScore]:
    """Every pair of every paradigm, in one pass of batches; a pair is right only when good scores strictly
    higher than bad (a tie is wrong)."""
    sequences = sentence_tokens(tokenizer, [s for p in paradigms for pair in p.pairs for s in pair])
    scores = iter(sentence_loglikelihoods(model, sequences, batch_size, progress))
    results = []
    for p in paradigms:
        lls = [(next(scores), next(scores)) for _ in p.pairs]
        results.append(ParadigmScore(p.uid, p.field, len(lls), sum(good > bad for good, bad in lls), lls))
    return results


# ----------------------------------------------------------------------------- summaries

def summary(results: list[ParadigmScore]) -> dict:
    """The means over paradigms, overall (with a 95% bootstrap interval over paradigms: which phenomena were
    tested) and per field (fields with no paradigm here are left out), and each paradigm's accuracy: what
    evaluate.py prints and writes."""
    names = [*FIELDS, *sorted({r.field for r in results} - set(FIELDS))]
    fields = {f: [r.accuracy for r in results if r.field == f] for f in names}
    accuracies = [r.accuracy for r in results]
    interval = stats.bootstrap_mean_interval(accuracies)
    return {"benchmark": "blimp",
            "overall": stats.mean(accuracies),
            "overall_interval": None if math.isnan(interval[0]) else list(interval),  # None: one paradigm
            "fields": {f: stats.mean(accs) for f, accs in fields.items() if accs},
            "paradigms": [{"UID": r.uid, "field": r.field, "accuracy": r.accuracy, "correct": r.correct,
                           "pairs": r.pairs} for r in results]}


def report_lines(s: dict) -> list[str]:
    lines = [f"{p['UID']:<55} {p['accuracy']:.4f}  ({p['correct']}/{p['pairs']}, {p['field']})"
             for p in s["paradigms"]]
    lines += [f"field {name:<49} {acc:.4f}" for name, acc in s["fields"].items()]
    interval = "" if s["overall_interval"] is None else \
        "  (95% bootstrap interval over paradigms {:.4f}-{:.4f})".format(*s["overall_interval"])
    lines.append(f"{'overall (mean over ' + str(len(s['paradigms'])) + ' paradigms)':<55} {s['overall']:.4f}{interval}")
    return lines


def write_summary(s: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(s, indent=1) + "\n", "BLiMP results")


def score_checkpoint(checkpoint: Path, data: str | Path, cache: Path, batch_size: int = 64) -> dict:
    """A checkpoint's BLiMP summary (device and dtype: auto), kept in `cache` (a JSON file) and read back from
    it while it is newer than the checkpoint and was scored on the same data folder."""
    data = str(Path(data).absolute())
    if cache.is_file() and cache.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if saved.get("data") == data:
                return saved
        except ValueError:
            pass  # torn or edited: scored again
    rt = local_runtime("auto", "auto")
    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint), rt.device, str(checkpoint))
    with rt.autocast():
        result = {"data": data, **summary(score_paradigms(model, tokenizer, read_paradigms(data), batch_size))}
    write_summary(result, cache)
    return result
