"""Training health: see a run going wrong while it runs, survive bad steps, and keep an average of the weights.

Five parts, used by the training loop through one `Health` object (docs/health.md explains the numbers):
    guard        every step: a bad step (a non-finite loss or gradient, or a loss spike) has its update skipped
                 on the device, without a host sync where the optimizer allows it (fused AdamW's found_inf)
    spikes       a spike is a loss above median + k * MAD of the last SPIKE_WINDOW accepted losses, or, from the
                 first step, a blow-up: a loss above START_FACTOR x the run's first loss
    divergence   SPIKE_WINDOW steps in a row with a non-finite loss or gradient or a blow-up stop the run (Diverged)
    rollback     --on_spike rollback: an in-memory snapshot of the model and optimizer every snapshot_interval
                 steps, restored when a bad step is seen; the batches in between are skipped
    telemetry    every health_interval steps, per layer (embed, block0 .., head): gradient norm, update-to-weight
                 ratio |dw| / |w| of the step just taken, weight norm, output RMS, largest attention logit
    EMA          --ema_decay: an exponential moving average of the weights, updated after every step
"""

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from attention import MultiHeadAttention, attention_mask
from config import TrainConfig
from gpt import GPT
from gptlab.errors import Diverged, UsageError
from gptlab.metrics import pyplot, read_metrics, save_figure
from gptlab.runtime import Runtime

SPIKE_WINDOW = 50  # accepted losses the spike threshold is computed from
START_FACTOR = 3.0  # a loss above this x max(the run's first loss, 1 nat) is a blow-up, judged from the first step
MAD_FLOOR = 1e-3  # of the median: a window of identical losses must not make every tiny rise a spike
# Device-side running counts, read at log steps; "blown": a non-finite step or a blow-up (what divergence counts).
COUNTS = ("steps", "skipped", "nonfinite", "spikes", "clipped", "blown")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: embed (token and position embeddings; a tied head's matrix is the token
    embedding), block<i>, or head (the final norm and an untied lm_head)."""
    if name.startswith("blocks."):
        return "block" + name.split(".")[1]
    return "embed" if name.startswith(("wte.", "wpe.")) else "head"


def layer_params(model: GPT) -> dict[str, list[nn.Parameter]]:
    layers: dict[str, list[nn.Parameter]] = {"embed": []}
    layers.update({f"block{i}": [] for i in range(len(model.blocks))})
    layers["head"] = []
    for name, p in model.named_parameters():  # tied parameters appear once, under their first name
        layers[layer_of(name)].append(p)
    return {name: params for name, params in layers.items() if params}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (FSDP shards parameters into DTensors)."""
    return t.to_local() if isinstance(t, DTensor) else t


def squared_norms(groups: list[list[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Sum of squares of each group's tensors (this rank's shards): one device tensor (groups,)."""
    return torch.stack([torch.stack(torch._foreach_norm([local(t).float() for t in g])).square().sum()
                        if g else torch.zeros((), device=device) for g in groups])


@contextlib.contextmanager
def hooks(outputs: dict[str, nn.Module], rms: dict[str, torch.Tensor], logit_max: dict[str, torch.Tensor],
          blocks: nn.ModuleList) -> Iterator[None]:
    """While inside: each module of `outputs` puts the mean square of its output in rms[name], and each block's
    attention its largest pre-softmax logit in logit_max[block<i>]."""
    def keep_rms(name: str) -> Any:
        return lambda module, args, out: rms.__setitem__(name, out.float().square().mean())

    def keep_logit_max(name: str) -> Any:
        def hook(attn: MultiHeadAttention, args: tuple) -> None:
            x, padding_mask, _, positions = (*args, None, None, None)[:4]
            logit_max[name] = attention_logit_max(attn, x, padding_mask, positions)
        return hook

    handles = [module.register_forward_hook(keep_rms(name)) for name, module in outputs.items()]
    handles += [b.attn.register_forward_pre_hook(keep_logit_max(f"block{i}")) for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def keyed(stat: str, layers: list[str], values: torch.Tensor) -> dict[str, float]:
    """{"stat/layer": value}: the metrics keys of one statistic (docs/health.md)."""
    return {f"{stat}/{layer}": v for layer, v in zip(layers, values.tolist(), strict=True)}


def named(counts: torch.Tensor) -> dict[str, float]:
    return dict(zip(COUNTS, counts.tolist(), strict=True))


def padded(counts: torch.Tensor) -> torch.Tensor:
    """Counts saved before the later ones of COUNTS existed, with those at zero."""
    return torch.cat([counts, counts.new_zeros(len(COUNTS) - len(counts))])


def describe_event(event: dict[str, Any]) -> str:
    """An event of `Health.check` as the line shown on screen."""
    if event["event"] == "skipped":
        return (f"{event['updates']} of the last {event['of']} updates skipped ({event['nonfinite']} non-finite, "
                f"{event['spikes']} loss spikes)")
    if event["event"] == "rollback":
        return (f"rolled back to the snapshot of step {event['to_step']} (lr x {event['lr_factor']:g} until step "
                f"{event['until_step']})")
    return f"no rollback: {event['reason']}"


def all_reduce(t: torch.Tensor, op: dist.ReduceOp, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=op)
    return t


class SpikeDetector:
    """Device-side: whether a loss is a spike, and the window of accepted losses it is judged against."""

    def __init__(self, k: float, device: torch.device) -> None:
        self.k = k
        self.losses = torch.full((SPIKE_WINDOW,), math.nan, device=device)  # NaN: not filled yet
        self.start = torch.full((), math.nan, device=device)  # the run's first finite loss
        self.written = torch.zeros((), dtype=torch.long, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # consecutive spikes

    def threshold(self) -> torch.Tensor:
        """median + k * MAD of the window; +inf until the window is full (no judgement on too few losses)."""
        median = self.losses.nanmedian()
        mad = (self.losses - median).abs().nanmedian().clamp_min(MAD_FLOOR * median.abs())
        return torch.where(self.losses.isnan().any(), math.inf, median + self.k * mad)

    def observe(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(spike, blow-up), device bools: a blow-up (far above the first loss) is a spike from the first step on;
        a finite loss that is neither joins the window. After SPIKE_WINDOW spikes in a row the level has moved,
        not spiked: losses are accepted again, but never a blow-up."""
        self.start = torch.where(self.start.isnan() & loss.isfinite(), loss, self.start)
        blown = loss > START_FACTOR * self.start.clamp_min(1.0)  # False while start is NaN
        spike = (loss > self.threshold()) | blown
        self.streak = torch.where(spike, self.streak + 1, 0)
        write = loss.isfinite() & ~blown & (~spike | (self.streak > SPIKE_WINDOW))
        slot = (self.written % SPIKE_WINDOW).view(1)
        self.losses.index_copy_(0, slot, torch.where(write, loss, self.losses[slot]).view(1))
        self.written += write.long()
        return spike, blown

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu().clone() for name in ("losses", "written", "streak", "start")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():  # a checkpoint from before `start` sets it at its next finite loss
            getattr(self, name).copy_(value)


class Snapshot:
    """An in-memory copy of the weights, the optimizer state and the EMA, on their own device. Under FSDP each rank
    copies its shards (the local tensors of the DTensors: foreach ops have no DTensor rule)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: "WeightAverage | None",
                 step: int) -> None:
        self.step = step
        self.weights = [local(p).detach().clone() for p in model.parameters()]
        self.optimizer = {p: {k: local(v).clone() if torch.is_tensor(v) else v for k, v in s.items()}
                          for p, s in optimizer.state.items()}
        self.ema = [t.clone() for t in ema.tensors] if ema else []

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: "WeightAverage | None") -> None:
        """In place (copy_), so DDP, FSDP and the optimizer keep their references to the same tensors."""
        torch._foreach_copy_([local(p) for p in model.parameters()], self.weights)
        for p, saved in self.optimizer.items():
            state = optimizer.state[p]
            for k, v in saved.items():
                if torch.is_tensor(v):
                    local(state[k]).copy_(v)
                else:
                    state[k] = v
        if ema:
            torch._foreach_copy_(ema.tensors, self.ema)


class WeightAverage:
    """Exponential moving average of the weights: ema = decay * ema + (1 - decay) * w after every step, kept
    in a copy of the model so it evaluates and saves like one."""

    def __init__(self, model: GPT, decay: float, state: dict[str, torch.Tensor] | None) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if state is not None:
            self.model.load_state_dict(state)
        self.tensors = list(self.model.parameters())
        self.sources = list(model.parameters())  # same order: deepcopy keeps it (and the tied weights)

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.tensors, self.sources, 1 - self.decay)


class Health:
    """The step guard, spike detector, rollback snapshot, telemetry and EMA of one training run."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, c: TrainConfig, rt: Runtime,
                 state: dict[str, Any] | None = None, ema_state: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.optimizer, self.c, self.rt = model, optimizer, c, rt
        device = next(model.parameters()).device
        self.detector = SpikeDetector(c.spike_threshold, device)
        self.counts = torch.zeros(len(COUNTS), device=device)
        self.grad_norm = torch.zeros((), device=device)  # the latest, before clipping
        self.layers = layer_params(model)
        self.checked = torch.zeros(len(COUNTS))  # counts as of the latest check, on the host
        self.snapshot: Snapshot | None = None
        self.rollbacks, self.slow_until = 0, 0  # slow_until: the lr is lowered before this step
        self.nonfinite_run = 0  # non-finite or blown-up steps in a row, as seen at the checks
        self.row: dict[str, float] = {}  # the telemetry of a health step, under construction
        self.weights_before: list[torch.Tensor] = []  # on a health step, between before_update and after_update
        self.weight_squares_before = torch.zeros(len(self.layers))
        if state is not None:
            self.load_state_dict(state)
        if c.ema_decay > 0 and rt.fsdp:
            raise UsageError("--ema_decay is not supported with --fsdp yet (the average would need sharding too)")
        self.ema = WeightAverage(model, c.ema_decay, ema_state) if c.ema_decay > 0 else None

    # ------------------------------------------------------------------ the step (called by train_step)

    def measures(self, step: int) -> bool:
        """Whether step (1-based: the step about to end) records telemetry."""
        return self.c.health_interval > 0 and step % self.c.health_interval == 0

    def before_update(self, it: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
        """Judge the step (loss and gradients in, update not yet applied); False: do not call the optimizer.
        Where the optimizer supports it, a bad step is skipped on the device instead and True returned."""
        mean_loss = all_reduce(loss.detach().clone(), dist.ReduceOp.SUM, self.rt) / self.rt.world_size
        finite = mean_loss.isfinite() & grad_norm.isfinite()
        spike, blown = self.detector.observe(mean_loss)
        spike = spike & finite
        ok = finite & ~spike
        clipped = grad_norm > self.c.grad_clip if self.c.grad_clip > 0 else torch.zeros_like(ok)
        self.counts += torch.stack([torch.ones_like(ok), ~ok, ~finite, spike, clipped, ~finite | blown]).float()
        self.grad_norm = grad_norm.detach().float()
        if self.measures(it + 1):
            self.record_before()
        if self.c.on_spike == "rollback" and it % self.c.snapshot_interval == 0 and it > 0 and bool(ok):
            self.snapshot = Snapshot(self.model, optimizer, self.ema, it)  # the weights this step's loss vouched for
        if getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled():
            optimizer.found_inf = (~ok).float()  # fused AdamW: the kernel leaves weights and moments untouched
            return True
        return bool(ok)  # a host sync: Muon (which syncs anyway), float16's GradScaler, non-fused AdamW

    def after_update(self, it: int, optimizer: torch.optim.Optimizer) -> None:
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        if self.measures(it + 1):
            self.record_after()
        if self.ema is not None:
            self.ema.update()

    def lr_factor(self, it: int) -> float:
        """The learning rate multiplier: rollback_lr_factor for snapshot_interval steps after a rollback."""
        return self.c.rollback_lr_factor if it < self.slow_until else 1.0

    # ------------------------------------------------------------------ telemetry

    def record_before(self) -> None:
        names, groups = list(self.layers), list(self.layers.values())
        grads = [[p.grad for p in g if p.grad is not None] for g in groups]
        square = torch.cat([squared_norms(grads, self.counts.device), squared_norms(groups, self.counts.device)])
        square = all_reduce(square, dist.ReduceOp.SUM, self.rt) if self.rt.fsdp else square
        self.weight_squares_before = square[len(names):]
        self.row.update(keyed("grad_norm", names, square[:len(names)].sqrt()))
        self.row.update(keyed("weight_norm", names, square[len(names):].sqrt()))
        self.weights_before = [local(p).detach().clone() for g in groups for p in g]

    @torch.no_grad()
    def record_after(self) -> None:
        names, groups = list(self.layers), list(self.layers.values())
        deltas, i = [], 0
        for g in groups:
            deltas.append([local(p) - self.weights_before[i + j] for j, p in enumerate(g)])
            i += len(g)
        square = squared_norms(deltas, self.counts.device)
        square = all_reduce(square, dist.ReduceOp.SUM, self.rt) if self.rt.fsdp else square
        ratios = (square / self.weight_squares_before.clamp_min(1e-30)).sqrt()
        self.row.update(keyed("update_ratio", names, ratios))
        self.weights_before = []

    @torch.no_grad()
    def probe(self, x: torch.Tensor) -> None:
        """Output RMS per layer and the largest attention logit per block, from a forward pass in eval mode (no
        dropout, so no random numbers drawn) of the plain model on the step's batch, with hooks on its modules.
        A separate pass leaves the training step (compiled or not) untouched; it costs one forward per health
        step. Every rank takes part: FSDP's forward needs all of them; the output RMS is averaged over ranks, the
        attention logit is the maximum over ranks."""
        model = self.model
        rms: dict[str, torch.Tensor] = {}
        logit_max: dict[str, torch.Tensor] = {}
        outputs = {"embed": model.drop, **{f"block{i}": b for i, b in enumerate(model.blocks)},
                   "head": model.lm_head}
        with hooks(outputs, rms, logit_max, model.blocks):
            model.eval()
            with self.rt.autocast():
                model(x)
            model.train()
        square = all_reduce(torch.stack(list(rms.values())), dist.ReduceOp.SUM, self.rt) / self.rt.world_size
        high = all_reduce(torch.stack(list(logit_max.values())), dist.ReduceOp.MAX, self.rt)
        self.row.update(keyed("act_rms", list(rms), square.sqrt()))
        self.row.update(keyed("attn_logit_max", list(logit_max), high))

    def take_row(self) -> dict[str, float]:
        """The telemetry of the step just ended (empty unless it was a health step)."""
        row, self.row = self.row, {}
        return row

    # ------------------------------------------------------------------ at log steps (host)

    def check(self, step: int) -> list[dict[str, Any]]:
        """Read the device counts (a sync, at log steps only) and act on the bad steps since the last check:
        rollback restores the snapshot, stop ends the run (Diverged), as do SPIKE_WINDOW non-finite or blown-up
        steps in a row. Returns the events to log and show."""
        counts = self.counts.cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
        new, self.checked = named(counts - self.checked), counts
        bad = int(new["skipped"])
        events = [{"event": "skipped", "updates": bad, "of": int(new["steps"]), "nonfinite": int(new["nonfinite"]),
                   "spikes": int(new["spikes"])}] if bad else []
        if bad and self.c.on_spike == "stop":
            raise Diverged(f"{bad} bad step(s) (a loss spike or a non-finite loss or gradient) by step {step}, "
                           f"and --on_spike stop")
        if bad and self.c.on_spike == "rollback":
            events.append(self.roll_back(step))
        all_blown = new["blown"] == new["steps"]
        self.nonfinite_run = self.nonfinite_run + int(new["steps"]) if all_blown else 0
        if self.nonfinite_run >= SPIKE_WINDOW:
            raise Diverged(f"the run diverged: the last {self.nonfinite_run} steps up to step {step} all had a "
                           f"non-finite loss or gradient, or a loss above {START_FACTOR:g}x the first one "
                           f"({self.detector.start.item():.4g}), and their updates were skipped. Try a lower --lr")
        return events

    def sound(self, loss: float) -> bool:
        """Whether weights that gave this loss may be kept as good: it is finite and no blow-up."""
        start = self.detector.start.item()
        return math.isfinite(loss) and not loss > START_FACTOR * max(start, 1.0)  # NaN start: no judgement yet

    def roll_back(self, step: int) -> dict[str, Any]:
        if self.snapshot is None:
            return {"event": "rollback_unavailable", "reason": "no snapshot yet; the bad steps were skipped"}
        self.snapshot.restore(self.model, self.optimizer, self.ema)
        self.rollbacks += 1
        self.slow_until = step + self.c.snapshot_interval
        return {"event": "rollback", "to_step": self.snapshot.step, "lr_factor": self.c.rollback_lr_factor,
                "until_step": self.slow_until}

    def counters(self) -> dict[str, float]:
        """For the log line: running totals, the fraction of steps clipped since the last check, the latest
        gradient norm before clipping."""
        total, new = named(self.counts.cpu()), named(self.counts.cpu() - self.checked)
        return {"grad_norm": self.grad_norm.item(), "clip_fraction": new["clipped"] / max(1.0, new["steps"]),
                "skipped_steps": int(total["skipped"]), "nonfinite_steps": int(total["nonfinite"]),
                "spike_steps": int(total["spikes"]), "rollbacks": self.rollbacks}

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "counts": self.counts.cpu().clone(),
                "checked": self.checked.clone(),
                "rollbacks": self.rollbacks, "slow_until": self.slow_until, "nonfinite_run": self.nonfinite_run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        self.counts.copy_(padded(state["counts"]))
        self.checked = padded(state["checked"])
        self.rollbacks, self.slow_until = state["rollbacks"], state["slow_until"]
        self.nonfinite_run = state["nonfinite_run"]


def attention_logit_max(attn: MultiHeadAttention, x: torch.Tensor, padding_mask: torch.Tensor | None,
                        positions: torch.Tensor | None) -> torch.Tensor:
    """The largest q . k / sqrt(d) any query gives a key it may attend to: the queries and keys recomputed from
    the attention's input by its own attention_inputs (as its forward makes them), one sequence at a time to
    bound memory at H x T x T."""
    t = x.size(1)
    q, k, _ = attn.attention_inputs(x, positions)
    mask = attention_mask(t, t, attn.causal, padding_mask, x.device, attn.window)
    highest = torch.full((), -math.inf, device=x.device)
    for i in range(x.size(0)):
        scores = (q[i:i + 1] @ k[i:i + 1].transpose(-2, -1)).float() / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores.masked_fill(~mask[i:i + 1] if mask.size(0) > 1 else ~mask, -math.inf)
        highest = torch.maximum(highest, scores.max())
    return highest


def plot_health(metrics_path: Path, png_path: Path) -> bool:
    """Layers x steps heat maps of the gradient norm and the update ratio (log colour scales), rollbacks marked
    by red dashed lines, from the JSONL file; False when the run logged no telemetry or matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.colors import LogNorm
    every = read_metrics(metrics_path)
    rows = [r for r in every if "grad_norm/embed" in r]
    if not rows:
        return False
    rollbacks = [r["step"] for r in every if r.get("event") == "rollback"]
    layers = [key.split("/", 1)[1] for key in rows[0] if key.startswith("grad_norm/")]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(8, 2.2 + 0.45 * len(layers)), sharex=True)
    for ax, stat, title in zip(axes, ("grad_norm", "update_ratio"),
                               ("gradient norm per layer", "update ratio |dw| / |w| per layer"), strict=True):
        grid = np.array([[r.get(f"{stat}/{layer}", np.nan) for r in rows] for layer in layers], dtype=float)
        grid[~(np.isfinite(grid) & (grid > 0))] = np.nan  # a zero (a skipped update) or inf shows as a gap
        if np.isnan(grid).all():
            continue
        image = ax.pcolormesh(step_edges(steps), np.arange(len(layers) + 1), grid, norm=LogNorm(), cmap="viridis")
        ax.set_yticks(np.arange(len(layers)) + 0.5, layers)
        ax.invert_yaxis()  # the embedding on top, the head at the bottom: the order data flows
        ax.set_title(title, fontsize=10)
        for step in rollbacks:  # where a rollback happened: the cells after it start from the snapshot
            ax.axvline(step, color="red", linestyle="--", linewidth=1)
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    save_figure(plt, fig, png_path, "health picture")
    return True


def step_edges(steps: list[int]) -> np.ndarray:
    """Cell edges for pcolormesh: each measurement covers the steps since the previous one."""
    first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1)
    return np.array([first, *steps], dtype=float)
