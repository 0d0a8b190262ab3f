"""Fine-tune a pretrained checkpoint to classify texts or text pairs (GPT-1 paper, Radford et al. 2018, 3.3).

    python finetune.py --checkpoint model_checkpoint.tar --train train.csv --val val.csv [--flags]
    python finetune.py --checkpoint finetuned.tar --predict new.csv        (classify with a fine-tuned model)

Data: CSV (a header row) or JSONL (one object per line), with a `label` and either a `text` (single-text
classification) or `text_a` and `text_b` (a pair: entailment, similarity). Labels are strings or integers;
their sorted order in the training file gives the class indices.

Input transformation (the paper's "traversal-style" inputs: one token sequence, no new architecture):
    decoder (causal)   text <cls>                      text_a <sep> text_b <cls>
    encoder            <cls> text <sep>                <cls> text_a <sep> text_b <sep>
A decoder classifies from the hidden state of its last token (<cls> has then read the whole input); an
encoder sees in both directions, so its first token serves. The head is dropout + one linear layer, and a
decoder keeps predicting the next token of its input as an auxiliary loss:
    loss = cross-entropy(class) + lm_weight * next-token loss
"""

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gpt import GPT
from gptlab.checkpoint import RAW_WEIGHTS_HELP, model_from_checkpoint, save_checkpoint
from gptlab.cli import FRACTION, NON_NEGATIVE, POSITIVE, SEED, Rule, check_fields, parse_dataclass, setting
from gptlab.errors import UsageError, run_cli
from gptlab.fileio import atomic_write_text, check_output
from gptlab.hf_folder import load_checkpoint_or_folder
from gptlab.runtime import Runtime, device_setting, dtype_setting, local_runtime
from gptlab.tokenizer import CLS, PAD, SEP, Tokenizer
from gptlab.training import Schedule, learning_rate, optimizer_step

TASKS = ("single", "pair")
Label = str | int
CSV_FIELD_LIMIT = 2 ** 31 - 1  # csv refuses fields over 128 kB by default; JSONL has no such limit


@dataclass(frozen=True)
class FinetuneConfig:
    """Every fine-tuning setting; the defaults are the GPT-1 paper's (section 4.1, "Fine-tuning details")."""

    checkpoint: str = setting("model_checkpoint.tar", "pretrained checkpoint (or, with --predict, a fine-tuned one)")
    train: str | None = setting(None, "labelled training data, .csv or .jsonl")
    val: str | None = setting(None, "labelled validation data: accuracy per epoch, and the predictions file")
    predict: str | None = setting(None, "classify this .csv/.jsonl with a fine-tuned --checkpoint (no training)")
    task: str | None = setting(None, "single (a text column) or pair (text_a, text_b); default: from the "
                               "training file's columns", choices=TASKS)
    epochs: int = setting(3, "passes over the training data", rule=POSITIVE)
    lr: float = setting(6.25e-5, "peak learning rate (AdamW)", rule=POSITIVE)
    batch_size: int = setting(32, "examples per step", rule=POSITIVE)
    lm_weight: float = setting(0.5, "weight λ of the auxiliary next-token loss (0 = none); decoders only, an "
                               "encoder ignores it", rule=NON_NEGATIVE)
    classifier_dropout: float = setting(0.1, "dropout before the classification layer", rule=FRACTION)
    warmup_fraction: float = setting(0.002, "fraction of the steps spent warming the learning rate up (0.2%); "
                                     "then linear decay to 0", rule=Rule("in [0, 1]", lambda v: 0 <= v <= 1))
    weight_decay: float = setting(0.01, "AdamW weight decay on matrices and embeddings (never biases or LayerNorm "
                                  "gains)", rule=NON_NEGATIVE)
    out: str = setting("finetuned.tar", "fine-tuned checkpoint to write", output=True)
    predictions: str = setting("predictions.jsonl", "JSONL file of predictions (one line per val or --predict "
                               "example)", output=True)
    overwrite: bool = setting(False, "replace an existing --out or --predictions file (an earlier run's)")
    seed: int = setting(1337, "seeds the head's initialisation, dropout and the shuffling", rule=SEED)
    raw_weights: bool = setting(False, RAW_WEIGHTS_HELP)
    device: str = device_setting()
    dtype: str = dtype_setting()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.predict is not None:
            if self.train is not None or self.val is not None:
                raise UsageError("give --train and --val to fine-tune, or --predict to classify; not both")
        elif self.train is None or self.val is None:
            raise UsageError("fine-tuning needs --train and --val files (or --predict FILE to classify)")
        if self.lr * self.weight_decay >= 1:  # AdamW multiplies each weight by 1 - lr * weight_decay per step
            raise UsageError(f"--lr {self.lr} times --weight_decay {self.weight_decay} must be below 1")

    def check_outputs(self) -> None:
        """Before any work: each output can be written, replaces no earlier file unless --overwrite, and is none of
        the inputs nor the other output."""
        inputs = [("--checkpoint", self.checkpoint), ("--train", self.train), ("--val", self.val),
                  ("--predict", self.predict)]
        if self.predict is None:
            check_output(self.out, "--out", inputs, [("--predictions", self.predictions)], self.overwrite)
        check_output(self.predictions, "--predictions", inputs,
                     [("--out", self.out)] if self.predict is None else [], self.overwrite)


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    return parse_dataclass(FinetuneConfig, "Fine-tune a checkpoint to classify texts or text pairs (GPT-1 style).",
                           argv)


# ----------------------------------------------------------------------------- reading labelled data

@dataclass
class Example:
    text_a: str  # the text of a single-text task
    text_b: str | None  # None for a single-text task
    label: Label | None  # None when an unlabelled file is classified


def read_records(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every record of a .csv (header row first) or .jsonl file."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        # utf-8-sig: a byte-order mark (spreadsheet programs write one) is not part of the first column's name
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.endswith(".jsonl"):
                records = [(n, _json_object(line, path, n)) for n, line in enumerate(f, 1) if line.strip()]
            elif path.endswith(".csv"):
                reader = csv.DictReader(f)
                records = [(reader.line_num, row) for row in reader]
            else:
                raise UsageError(f"{path}: give a .csv or .jsonl file")
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not records:
        raise UsageError(f"{path} holds no examples")
    return records


def _json_object(line: str, path: str, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path} line {n}: expected a JSON object with text and label fields")
    return record


def infer_task(columns: set[str], path: str, task: str | None) -> str:
    """The task the columns hold; a forced task must find its columns."""
    single, pair = "text" in columns, {"text_a", "text_b"} <= columns
    if task == "single" and not single:
        if pair:
            raise UsageError(f"{path} holds text pairs (text_a, text_b), but the task is single-text: "
                             f"give a text column, or fine-tune a pair task (--task pair)")
        raise UsageError(f"{path} has no text column (found: {', '.join(sorted(columns))})")
    if task == "pair" and not pair:
        raise UsageError(f"{path} has no text_a and text_b columns, which a pair task needs "
                         f"(found: {', '.join(sorted(columns))})")
    if task is not None:
        return task
    if single == pair:
        raise UsageError(f"{path}: give either a text column or text_a and text_b columns, not "
                         f"{'both' if single else 'neither'} (found: {', '.join(sorted(columns))})")
    return "single" if single else "pair"


def read_examples(path: str, task: str | None, need_label: bool = True) -> tuple[list[Example], str]:
    """The examples of a data file and its task (see infer_task); labels are required when need_label."""
    records = read_records(path)
    task = infer_task(set(records[0][1]), path, task)
    text_columns = ("text",) if task == "single" else ("text_a", "text_b")
    if need_label and "label" not in records[0][1]:
        raise UsageError(f"{path} has no label column")
    examples = []
    for n, record in records:
        texts = []
        for column in text_columns:
            value = record.get(column)
            if not isinstance(value, str):
                raise UsageError(f"{path} line {n}: {column} is {'missing' if value is None else 'not a string'}")
            if not value.strip():
                raise UsageError(f"{path} line {n}: {column} is empty")
            texts.append(value)
        label = record.get("label")
        if label is None or label == "":
            if need_label:
                raise UsageError(f"{path} line {n}: no label")
        elif isinstance(label, bool) or not isinstance(label, str | int):
            raise UsageError(f"{path} line {n}: a label must be a string or an integer, got {label!r}")
        examples.append(Example(texts[0], texts[1] if task == "pair" else None, label if label != "" else None))
    return examples, task


def label_list(examples: list[Example]) -> list[Label]:
    """The training labels, sorted (integers first, then strings): the class index is the position here."""
    return sorted({e.label for e in examples}, key=lambda v: (isinstance(v, str), v))


def label_ids(examples: list[Example], labels: list[Label], path: str) -> torch.Tensor:
    index = {label: i for i, label in enumerate(labels)}
    unseen = sorted({e.label for e in examples if e.label not in index}, key=str)
    if unseen:
        raise UsageError(f"{path} has label(s) never seen in training: {', '.join(map(repr, unseen[:5]))} "
                         f"(training labels: {', '.join(map(repr, labels[:10]))})")
    return torch.tensor([index[e.label] for e in examples])


# ----------------------------------------------------------------------------- input transformation

@dataclass(frozen=True)
class InputFormat:
    """How examples become token sequences for one model (see the module docstring)."""

    causal: bool
    cls_id: int
    sep_id: int
    pad_id: int
    block_size: int

    @classmethod
    def for_model(cls, model: GPT, tokenizer: Tokenizer) -> "InputFormat":
        purpose = "fine-tuning"
        return cls(model.config.causal, tokenizer.special_id(CLS, purpose), tokenizer.special_id(SEP, purpose),
                   tokenizer.special_id(PAD, purpose), model.config.block_size)

    def describe(self, task: str) -> str:
        if self.causal:
            return "text <cls>" if task == "single" else "text_a <sep> text_b <cls>"
        return "<cls> text <sep>" if task == "single" else "<cls> text_a <sep> text_b <sep>"

    def build(self, a: list[int], b: list[int] | None) -> tuple[list[int], bool]:
        """The token sequence of one example, and whether its text had to be cut to fit block_size."""
        specials = (1 if self.causal else 2) + (b is not None)
        budget = self.block_size - specials
        if budget < 2:
            raise UsageError(f"block_size {self.block_size} leaves no room for the text")
        cut = len(a) + len(b or []) > budget
        if b is None:
            a = a[:budget]
        else:  # cut the longer text first, so a short premise survives a long hypothesis and vice versa
            while len(a) + len(b) > budget:
                if len(a) >= len(b):
                    a = a[:-1]
                else:
                    b = b[:-1]
        middle = a if b is None else a + [self.sep_id] + b
        if self.causal:
            return middle + [self.cls_id], cut
        return [self.cls_id] + middle + [self.sep_id], cut


def encode_examples(examples: list[Example], tokenizer: Tokenizer, fmt: InputFormat, path: str) -> list[list[int]]:
    a = tokenizer.encode_batch([e.text_a for e in examples])
    b = tokenizer.encode_batch([e.text_b for e in examples]) if examples[0].text_b is not None else None
    built = [fmt.build(a[i], b[i] if b is not None else None) for i in range(len(examples))]
    cut = sum(c for _, c in built)
    if cut:
        print(f"notice: {cut} of {len(examples)} examples in {path} are longer than block_size "
              f"{fmt.block_size} tokens; their text was cut (the special tokens kept)", file=sys.stderr)
    return [ids for ids, _ in built]


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the padding mask (B, T), True for real tokens."""
    longest = max(map(len, sequences))
    idx = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, s in enumerate(sequences):
        idx[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return idx, mask


# ----------------------------------------------------------------------------- model and loss

class Classifier(nn.Module):
    """The pretrained GPT plus a classification head reading one position: the last real token of a
    decoder, the first token of an encoder."""

    def __init__(self, gpt: GPT, num_labels: int, classifier_dropout: float) -> None:
        super().__init__()
        self.gpt = gpt
        self.dropout = nn.Dropout(classifier_dropout)
        self.head = nn.Linear(gpt.config.embedding_dim, num_labels)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, num_labels) and the final hidden states (B, T, E)."""
        hidden = self.gpt.hidden_states(idx, padding_mask=mask)
        position = mask.sum(dim=1) - 1 if self.gpt.config.causal else torch.zeros_like(mask[:, 0], dtype=torch.long)
        summary = hidden[torch.arange(idx.size(0), device=idx.device), position]  # (B, E)
        return self.head(self.dropout(summary)), hidden

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        groups = self.gpt.optimizer_groups(weight_decay)
        groups[0]["params"].append(self.head.weight)  # the head's matrix decays like the model's
        groups[1]["params"].append(self.head.bias)
        return groups


def loss_terms(model: Classifier, idx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
               lm_weight: float) -> dict[str, torch.Tensor]:
    """{"classification", "lm" (a decoder with lm_weight > 0 only: never computed otherwise), "total"}."""
    logits, hidden = model(idx, mask)
    terms = {"classification": F.cross_entropy(logits.float(), labels)}
    terms["total"] = terms["classification"]
    if lm_weight > 0 and model.gpt.config.causal:
        # Each real token predicts the next real one; padding is no target (-1 is ignored).
        targets = idx[:, 1:].masked_fill(~mask[:, 1:], -1)
        lm_logits = model.gpt.logits(hidden[:, :-1])  # the head, soft-capped if the model is
        terms["lm"] = F.cross_entropy(lm_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        terms["total"] = terms["classification"] + lm_weight * terms["lm"]
    return terms


def schedule(c: FinetuneConfig, total_steps: int) -> Schedule:
    """The paper's schedule: linear warmup to lr over warmup_fraction of the steps, then linear decay to 0."""
    return Schedule(c.lr, warmup_iters=math.ceil(c.warmup_fraction * total_steps), lr_schedule="linear", final_lr=0.0)


# ----------------------------------------------------------------------------- training and evaluation

@torch.no_grad()
def classify(model: Classifier, sequences: list[list[int]], pad_id: int, batch_size: int,
             rt: Runtime) -> torch.Tensor:
    """Class probabilities (N, num_labels), in eval mode (no dropout)."""
    model.eval()
    probs = []
    for start in range(0, len(sequences), batch_size):
        idx, mask = collate(sequences[start:start + batch_size], pad_id)
        with rt.autocast():
            logits, _ = model(idx.to(rt.device), mask.to(rt.device))
        probs.append(logits.float().softmax(dim=-1).cpu())
    return torch.cat(probs)


def evaluate(model: Classifier, sequences: list[list[int]], labels: torch.Tensor, pad_id: int, batch_size: int,
             rt: Runtime) -> tuple[dict[str, float], torch.Tensor]:
    """Mean classification loss and accuracy, and the probabilities they come from."""
    probs = classify(model, sequences, pad_id, batch_size, rt)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    accuracy = (probs.argmax(dim=-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}, probs


def train_epoch(model: Classifier, optimizer: torch.optim.Optimizer, sequences: list[list[int]],
                labels: torch.Tensor, c: FinetuneConfig, pad_id: int, first_step: int, total_steps: int,
                generator: torch.Generator, rt: Runtime, epoch: int) -> float:
    """One shuffled pass over the training set; returns the mean total loss."""
    model.train()
    order = torch.randperm(len(sequences), generator=generator).tolist()
    lr_schedule = schedule(c, total_steps)
    batches = [order[i:i + c.batch_size] for i in range(0, len(order), c.batch_size)]
    total = 0.0
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)  # float16 needs loss scaling

    def batch_loss(batch: list[int]) -> torch.Tensor:
        idx, mask = collate([sequences[j] for j in batch], pad_id)
        return loss_terms(model, idx.to(rt.device), mask.to(rt.device), labels[batch].to(rt.device),
                          c.lm_weight)["total"]

    bar = tqdm(batches, desc=f"epoch {epoch}/{c.epochs}", unit="batch", dynamic_ncols=True, disable=None)
    for i, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(first_step + i, total_steps, lr_schedule)
        loss = optimizer_step(model, optimizer, scaler, rt, [batch], batch_loss, grad_clip=0.0).item()
        if not math.isfinite(loss):
            raise UsageError(f"loss became {loss} in epoch {epoch}; try a lower --lr")
        total += loss
        bar.set_postfix(loss=f"{loss:.4f}")
    return total / len(batches)


def write_predictions(path: str, examples: list[Example], labels: list[Label], probs: torch.Tensor) -> None:
    """One JSON line per example: its text(s), gold label (when known), predicted label and its probability.
    Written atomically, so a failure never leaves a half-written file."""
    lines = []
    for e, p in zip(examples, probs, strict=True):
        texts = {"text": e.text_a} if e.text_b is None else {"text_a": e.text_a, "text_b": e.text_b}
        gold = {} if e.label is None else {"label": e.label}
        best = int(p.argmax())
        lines.append(json.dumps({**texts, **gold, "predicted": labels[best], "probability": round(float(p[best]), 6)}))
    atomic_write_text(path, "".join(line + "\n" for line in lines), "predictions")


def fine_tune(c: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune c.checkpoint on c.train, reporting on c.val each epoch; writes c.out and c.predictions.
    Returns {"history": [per-epoch metrics], "labels", "task"}."""
    c.check_outputs()
    rt = local_runtime(c.device, c.dtype)  # before the checkpoint: a missing device is the device's fault
    ckpt = load_checkpoint_or_folder(c.checkpoint)  # on the CPU: only the model moves to the device
    ckpt.pop("optimizer", None)  # a pretrained run's AdamW moments: not needed here
    gpt, tokenizer = model_from_checkpoint(ckpt, rt.device, c.checkpoint, c.raw_weights)
    fmt = InputFormat.for_model(gpt, tokenizer)
    train_examples, task = read_examples(c.train, c.task)
    val_examples, _ = read_examples(c.val, task)
    labels = label_list(train_examples)
    if len(labels) < 2:
        raise UsageError(f"{c.train} has a single label ({labels[0]!r}): nothing to classify")
    train_y, val_y = label_ids(train_examples, labels, c.train), label_ids(val_examples, labels, c.val)
    train_x = encode_examples(train_examples, tokenizer, fmt, c.train)
    val_x = encode_examples(val_examples, tokenizer, fmt, c.val)

    torch.manual_seed(c.seed)
    model = Classifier(gpt, len(labels), c.classifier_dropout).to(rt.device)
    fused = rt.device.type in ("cpu", "cuda")  # one kernel for all parameters, as in training.make_optimizer
    optimizer = torch.optim.AdamW(model.optimizer_groups(c.weight_decay), lr=c.lr, fused=fused)
    generator = torch.Generator().manual_seed(c.seed)
    steps_per_epoch = math.ceil(len(train_x) / c.batch_size)
    lm_note = f", lm_weight {c.lm_weight}" if gpt.config.causal else " (an encoder: no auxiliary LM loss)"
    print(f"fine-tuning {'a decoder' if gpt.config.causal else 'an encoder'} on {len(train_x)} examples "
          f"({task}: {fmt.describe(task)}), {len(labels)} labels, {c.epochs} epochs x {steps_per_epoch} steps"
          f"{lm_note}; val {len(val_x)} examples")

    history = []
    for epoch in range(1, c.epochs + 1):
        train_loss = train_epoch(model, optimizer, train_x, train_y, c, fmt.pad_id, (epoch - 1) * steps_per_epoch,
                                 c.epochs * steps_per_epoch, generator, rt, epoch)
        val, probs = evaluate(model, val_x, val_y, fmt.pad_id, c.batch_size, rt)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                        "val_accuracy": val["accuracy"]})
        print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
              f"val accuracy {val['accuracy']:.4f}")
        save_checkpoint({"model_config": ckpt["model_config"], "model": gpt.state_dict(),
                         "tokenizer": tokenizer.to_json(), "head": model.head.state_dict(), "labels": labels,
                         "task": task, "input_format": fmt.describe(task), "finetune_config": asdict(c),
                         "epoch": epoch, "val_accuracy": val["accuracy"]}, c.out)
    write_predictions(c.predictions, val_examples, labels, probs)
    print(f"checkpoint: {c.out}; predictions: {c.predictions}")
    return {"history": history, "labels": labels, "task": task}


def predict(c: FinetuneConfig) -> dict[str, Any]:
    """Classify c.predict with the fine-tuned c.checkpoint; writes c.predictions (and reports accuracy when
    the file has labels)."""
    c.check_outputs()
    rt = local_runtime(c.device, c.dtype)  # before the checkpoint: a missing device is the device's fault
    ckpt = load_checkpoint_or_folder(c.checkpoint)  # on the CPU: only the model moves to the device
    if "head" not in ckpt:
        raise UsageError(f"{c.checkpoint} is not a fine-tuned checkpoint (no classification head): "
                         f"fine-tune it first with --train and --val")
    gpt, tokenizer = model_from_checkpoint(ckpt, rt.device, c.checkpoint)
    labels = ckpt.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or ckpt.get("task") not in TASKS:
        raise UsageError(f"{c.checkpoint}: its labels or task entry is damaged")
    model = Classifier(gpt, len(labels), 0.0).to(rt.device)
    try:
        model.head.load_state_dict(ckpt["head"])
    except (RuntimeError, TypeError, KeyError, AttributeError):
        raise UsageError(f"{c.checkpoint}: its classification head does not fit its {len(labels)} labels") from None
    fmt = InputFormat.for_model(gpt, tokenizer)
    examples, _ = read_examples(c.predict, ckpt["task"], need_label=False)
    probs = classify(model, encode_examples(examples, tokenizer, fmt, c.predict), fmt.pad_id, c.batch_size, rt)
    result: dict[str, Any] = {"examples": len(examples)}
    labelled = [i for i, e in enumerate(examples) if e.label is not None]
    if labelled:
        gold = label_ids([examples[i] for i in labelled], labels, c.predict)
        result["accuracy"] = (probs[labelled].argmax(dim=-1) == gold).float().mean().item()
        print(f"accuracy {result['accuracy']:.4f} on the {len(labelled)} labelled examples of {c.predict}")
    write_predictions(c.predictions, examples, labels, probs)
    print(f"predictions: {c.predictions} ({len(examples)} examples)")
    return result


def main(argv: list[str] | None = None) -> None:
    c = parse_args(argv)
    predict(c) if c.predict is not None else fine_tune(c)


if __name__ == "__main__":
    run_cli(main)
