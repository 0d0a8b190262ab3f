"""What a model learns: each objective owns its batches, its loss and what its evaluation reports.

    NextToken  a causal decoder (GPT) predicts every window's next tokens; reported: val bits per byte
    MaskedLM   a bidirectional encoder (BERT) recovers hidden tokens; reported: masked-token accuracy

A new objective is a class with the same members (name, causal, writes_text; batch, loss, report, describe), a
place in the `Objective` union, a branch in `objective_for`, and its name among --objective's choices (config.py).
"""

import math

import numpy as np
import torch
from torch import nn

from gptlab.data import Masking, TokenSplit, get_batch
from gptlab.tokenizer import MASK, Tokenizer


class NextToken:
    """Next-token prediction (Radford et al. 2018): x = tokens[i : i+T], y = tokens[i+1 : i+T+1]."""

    name = "clm"
    causal = True  # the model may look only at the past
    writes_text = True  # it can continue text, so a run ends with a sample

    def batch(self, split: TokenSplit, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(split, batch_size, block_size, rng)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, mean cross-entropy over the targets that are not -1)."""
        return model(x, y)

    def report(self, train_loss: float, val_loss: float, val_accuracy: float, val: TokenSplit) -> dict[str, float]:
        """Loss per token in bits, times tokens per byte of text: bits per byte, comparable across tokenizers."""
        bpb = val_loss / math.log(2) * val.num_tokens / val.num_bytes
        return {"train_loss": train_loss, "val_loss": val_loss, "val_bpb": bpb}

    @staticmethod
    def describe(final: dict[str, float]) -> str:
        return f"val bits/byte {final['val_bpb']:.4f}"


class MaskedLM(NextToken):
    """BERT's masked-language modelling (Devlin et al. 2019): the loss covers only the masked tokens, so bits per
    byte would mean nothing; the share of masked tokens the model ranks first is reported instead."""

    name = "mlm"
    causal = False
    writes_text = False

    def __init__(self, masking: Masking) -> None:
        self.masking = masking

    def batch(self, split: TokenSplit, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(split, batch_size, block_size, rng, self.masking)

    def report(self, train_loss: float, val_loss: float, val_accuracy: float, val: TokenSplit) -> dict[str, float]:
        return {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy}

    @staticmethod
    def describe(final: dict[str, float]) -> str:
        return f"val masked-token accuracy {final['val_accuracy']:.4f}"


Objective = NextToken | MaskedLM


def objective_for(name: str, tokenizer: Tokenizer, mask_prob: float) -> Objective:
    if name == "clm":
        return NextToken()
    mask_id = tokenizer.special_id(MASK, "--objective mlm")
    return MaskedLM(Masking(mask_id, tokenizer.special_ids, tokenizer.vocab_size, mask_prob))
