"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") for the weight matrices
inside the transformer blocks, and AdamW for every other parameter, in one torch.optim.Optimizer.

One optimizer object keeps the training loop, GradScaler, optimizer.state_dict() and torch.distributed.checkpoint's
get/set_optimizer_state_dict unchanged. Each param group says which rule it follows with `use_muon`.

Muon step for a matrix W (rows x cols) with gradient G:
    buf = momentum * buf + G
    M   = G + momentum * buf            (Nesterov; plain momentum uses M = buf)
    O   = newton_schulz(M)              (M with its singular values pushed to about 1: U S V^T -> ~U V^T)
    W  -= lr * sqrt(max(1, rows / cols)) * O      (after decoupled weight decay W *= 1 - lr * weight_decay)

Muon needs each whole matrix on one process. Under DDP every rank holds the full, all-reduced gradient and the
same weights, so each rank computes the same update: exact. FSDP2 shards matrices into DTensors, which Muon
refuses (see require_whole_matrices).
"""

import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from gptlab.errors import UsageError


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix: with g = U S V^T, return about U V^T, in g's dtype.

    Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X = U p(S) V^T with p(s) = a s + b s^3 + c s^5: the
    singular vectors stay, and every singular value goes through the same odd polynomial. Dividing by the
    Frobenius norm first puts all singular values in [0, 1]. The coefficients (Jordan's tuning) make the slope
    at zero large (a = 3.4445), so small singular values grow about 3.4x per step; the price is that
    the iteration does not converge to exactly 1 (p(1) = 0.70): the values end up oscillating in a band of
    roughly [0.7, 1.2], which trains as well as an exact U V^T at a fraction of an SVD's cost. A singular value
    below about ||g||_F / 700 (0.7 / 3.4445^5) has not reached the band after five steps.
    Works in float32, so a CPU run is deterministic and resumes bit for bit.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller (min(rows, cols))^2 Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # eps: a zero gradient stays zero instead of becoming NaN
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


def require_whole_matrices(params: Iterable[torch.Tensor]) -> None:
    """Muon orthogonalises each matrix as a whole; FSDP2 gives each rank a shard (a DTensor) of it."""
    if any(isinstance(p, DTensor) for p in params):
        raise UsageError("--optimizer muon does not support --fsdp: Muon orthogonalises whole weight matrices "
                         "and FSDP shards them across ranks; train with DDP (torchrun without --fsdp) or "
                         "--optimizer adamw")


class Muon(torch.optim.Optimizer):
    """Muon on the param groups with use_muon=True (2-D matrices), AdamW on those with use_muon=False.

    A group's missing settings come from the constructor: lr, momentum, nesterov, ns_steps, weight_decay for
    Muon groups; adamw_lr, betas, eps, adamw_weight_decay for AdamW groups.
    """

    def __init__(self, param_groups: list[dict], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0, adamw_lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0) -> None:
        self.muon_defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                              "weight_decay": weight_decay}
        self.adamw_defaults = {"lr": adamw_lr, "betas": tuple(betas), "eps": eps,
                               "weight_decay": adamw_weight_decay}
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("every Muon param group needs use_muon=True (Muon) or False (AdamW)")
        defaults = self.muon_defaults if param_group["use_muon"] else self.adamw_defaults
        allowed = {"params", "use_muon", "embedding", *defaults}  # embedding: --embedding_lr's group
        if unknown := set(param_group) - allowed:
            raise ValueError(f"unknown settings for a {'Muon' if param_group['use_muon'] else 'AdamW'} "
                             f"group: {sorted(unknown)}")
        group = {**defaults, **param_group}
        if group["use_muon"]:
            params = list(group["params"])
            require_whole_matrices(params)
            if any(p.dim() != 2 for p in params):
                raise ValueError("Muon groups hold 2-D weight matrices only")
            group["params"] = params
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        g = p.grad
        buf.mul_(group["momentum"]).add_(g)
        m = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        o = newton_schulz(m, group["ns_steps"])
        # O has singular values ~1, so its RMS entry is ~1/sqrt(cols) for a wide matrix but ~1/sqrt(rows) for a
        # tall one; the factor gives tall matrices (e.g. the MLP's first layer) the same per-entry step size.
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o, alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        """AdamW (Loshchilov & Hutter 2019): Adam's step plus weight decay applied to the weights directly."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the CPU, as torch's AdamW keeps it
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        beta1, beta2 = group["betas"]
        g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        m.mul_(beta1).add_(g, alpha=1 - beta1)  # first moment: running mean of the gradient
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment: running mean of its square
        # Bias correction: m and v start at zero, so early on they underestimate by (1 - beta^t).
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def muon_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, adam_lr: float,
                muon_lr: float, muon_momentum: float, betas: tuple[float, float],
                muon_weight_decay: float = 0.0) -> list[dict]:
    """Param groups for Muon: the 2-D weight matrices inside the transformer blocks go to Muon (with their own
    weight decay, muon_weight_decay); the rest (token and position embeddings, an untied lm_head, LayerNorm
    gains, biases) to AdamW, with weight decay on the >= 2-D tensors only, as GPT.decay_parameter_names decides
    for plain AdamW.

    Embeddings stay with AdamW: a row of an embedding is looked up, not multiplied, so orthogonalising the
    whole table has no meaning for it; the same holds for the (tied) head, whose rows are per-token scores.
    """
    muon, decay, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if "blocks." in name and p.dim() == 2:
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": muon, "use_muon": True, "lr": muon_lr, "momentum": muon_momentum,
               "weight_decay": muon_weight_decay},
              {"params": decay, "use_muon": False, "lr": adam_lr, "betas": betas, "weight_decay": weight_decay},
              {"params": no_decay, "use_muon": False, "lr": adam_lr, "betas": betas, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
