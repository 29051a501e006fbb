"""IMS: invertible masking with selection (Dunnett, Arablouei, Miller, Dedeoglu, Jurdak, "Backdoor Mitigation via
Invertible Pruning Masks", NeurIPS 2025, arXiv 2509.15497), as the survey authors' fork runs it (defense/ims.py).

Every Conv2d output channel is scaled by g = a + s (1 - a), a = sigmoid(k (m - 0.5)); the inverse mask uses 1 - m
(s -> 1: a channel both keep). Weights frozen, eval mode; m, s start at 1 (the fork's) and train with AdamW. A round
draws <= data.batch_size D_m images, fits per-sample pixel perturbations delta (the inverse net keeps the original's
prediction on x + delta, which leaves its prediction on x), then takes one mask step. Phases: initial (clean terms +
L1), minimize without, then with L1; each early-stopped on its own D_m round loss. The rounds run in `prepare()`
(max_epochs 0); `finish()` folds the final soft forward gate into the conv weights and biases (a plain backbone).
Differs from the fork (docs/fidelity.md, "IMS"): no delta fitted in the initial phase (used there for logging only);
the reference is the gate-free net, not a copy. The ViT variant (gates on transformer blocks) waits for a ViT backbone.
Defaults: configs/defense/ims.yaml (the fork's config/defense/ims/default.yaml).
Cost per image per round: initial 3 fwd + 2 bwd; minimize 46 fwd + 44 bwd (20 perturbation steps); at most
100 + 200 + 200 rounds; measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.pruning import mask_summary

Mode = Literal["forward", "inverse"] | None


def gate(mask: Tensor, selection: Tensor, k: float, inverse: bool = False) -> Tensor:
    """a + s (1 - a), a = sigmoid(k (m - 0.5)); the inverse mask puts 1 - m for m. In [0, 1] for m, s in [0, 1]."""
    a = torch.sigmoid(k * ((1 - mask if inverse else mask) - 0.5))
    return a + selection * (1 - a)


def overlap(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per sample, sum_c p_a(c) p_b(c): the probability that the two predictive distributions draw the same class."""
    return (logits_a.float().softmax(1) * logits_b.float().softmax(1)).sum(1)


def agreement(logits_a: Tensor, logits_b: Tensor, eps: float = 1e-8) -> Tensor:
    """-log sum_c p_a p_b, batch mean: small when both put their mass on the same class."""
    return -(overlap(logits_a, logits_b) + eps).log().mean()


def disagreement(logits_a: Tensor, logits_b: Tensor, eps: float = 1e-8) -> Tensor:
    """-log(1 - sum_c p_a p_b), batch mean: small when they put their mass on different classes."""
    return -(1 - overlap(logits_a, logits_b) + eps).log().mean()


class ChannelGates(nn.Module):
    """A mask m and a selection s per output channel of every Conv2d of `net`, both 1 at the start (the fork's: both
    gates are then the identity, and m gets no gradient until some s < 1). While `attached`, forward hooks multiply
    each conv's output by its gate; `mode` picks the forward or inverse mask, None leaves the network unchanged."""

    def __init__(self, net: nn.Module, k: float) -> None:
        super().__init__()
        convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"IMS gates Conv2d output channels, and {type(net).__name__} has none")
        self.names = [name for name, _ in convs]
        self.masks = nn.ParameterList(nn.Parameter(torch.ones(c.out_channels)) for _, c in convs)
        self.selections = nn.ParameterList(nn.Parameter(torch.ones(c.out_channels)) for _, c in convs)
        self.k = k
        self.mode: Mode = None

    def values(self, inverse: bool = False) -> list[Tensor]:
        return [gate(m, s, self.k, inverse) for m, s in zip(self.masks, self.selections)]

    def scaler(self, i: int) -> Any:
        """The forward hook of conv i: its output times its gates, per channel (nothing while `mode` is None)."""
        def scale(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            if self.mode is None:
                return None
            g = gate(self.masks[i], self.selections[i], self.k, self.mode == "inverse")
            return output * g.to(output.dtype).view(1, -1, 1, 1)
        return scale

    @contextmanager
    def attached(self, net: nn.Module) -> Iterator[None]:
        handles = [net.get_submodule(name).register_forward_hook(self.scaler(i)) for i, name in enumerate(self.names)]
        try:
            yield
        finally:
            self.mode = None
            for h in handles:
                h.remove()

    def l1(self) -> Tensor:
        """mean(1 - s) over all channels: the pull of every channel towards 'shared' (kept by both masks)."""
        return (1 - torch.cat(list(self.selections))).mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.parameters():
            p.clamp_(0.0, 1.0)

    @torch.no_grad()
    def fold_into(self, net: nn.Module, gates: list[Tensor]) -> None:
        """Multiply each conv's weight (and bias) by its channels' gates: the hooked forward, in the weights."""
        for name, g in zip(self.names, gates):
            conv = net.get_submodule(name)
            conv.weight.mul_(g.to(conv.weight.dtype).view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.mul_(g.to(conv.bias.dtype))


class EarlyStop:
    """The fork's rule: a round improves when its loss is below `improvement` x the best so far; stop once more than
    `patience` rounds in a row did not."""

    def __init__(self, patience: int, improvement: float) -> None:
        self.patience, self.improvement = patience, improvement
        self.best, self.waited = math.inf, 0

    def update(self, loss: float) -> bool:
        """Record a round's loss; True: stop."""
        if loss < self.best * self.improvement:
            self.best, self.waited = loss, 0
            return False
        self.waited += 1
        return self.waited > self.patience


class IMS(Defense):
    """Args:
        k: steepness of the sigmoid that turns a mask value m into a (soft) keep decision.
        l1_weight: weight of mean(1 - s) in the initial and last phases.
        mask_lr: AdamW learning rate of the masks and selections (a fresh optimiser per phase, as the fork).
        perturbation_lr, perturbation_steps: AdamW on the per-sample perturbations, from zero each round.
        perturbation_bound: each perturbation pixel is clamped to [-bound, bound] (0..1 pixel scale) after each step;
            x + delta itself is not clipped (the fork's).
        weight_decay: AdamW's decoupled weight decay of both optimisers (torch's default, which the fork keeps).
        initial_rounds, minimize_rounds: the most rounds of the initial phase and of each minimize phase.
        patience, improvement: a phase stops once more than `patience` rounds in a row failed to bring its loss
            (on that round's D_m batch, before the round's mask step) below `improvement` x its best.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    freeze_bn = True  # the fork's masked and reference models stay in eval mode
    smoke_args = ["--model.initial_rounds", "1", "--model.minimize_rounds", "1", "--model.perturbation_steps", "1"]

    def __init__(
        self,
        backdoored: str,
        k: float = 20.0,
        l1_weight: float = 10.0,
        mask_lr: float = 0.02,
        perturbation_lr: float = 1e-3,
        perturbation_steps: int = 20,
        perturbation_bound: float = 1.0,
        weight_decay: float = 0.01,
        initial_rounds: int = 100,
        minimize_rounds: int = 200,
        patience: int = 25,
        improvement: float = 0.98,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("k", k, k > 0, "> 0"), ("l1_weight", l1_weight, l1_weight >= 0, ">= 0"),
            ("mask_lr", mask_lr, mask_lr > 0, "> 0"), ("perturbation_lr", perturbation_lr, perturbation_lr > 0, "> 0"),
            ("perturbation_steps", perturbation_steps, perturbation_steps >= 1, ">= 1"),
            ("perturbation_bound", perturbation_bound, perturbation_bound > 0, "> 0 (pixels on the 0..1 scale)"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("initial_rounds", initial_rounds, initial_rounds >= 0, ">= 0"),
            ("minimize_rounds", minimize_rounds, minimize_rounds >= 0, ">= 0"),
            ("patience", patience, patience >= 0, ">= 0"),
            ("improvement", improvement, 0 < improvement <= 1, "in (0, 1]"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.net.requires_grad_(False)  # IMS learns the gates only
        # the learned gates (kept in the checkpoint for the record; the defended net has them folded in)
        self.gates = ChannelGates(self.net, k)
        self.history: dict[str, Any] = {}
        self._facts: dict[str, Any] = {}

    def logits(self, x: Tensor, mode: Mode) -> Tensor:
        """Logits of pixels x (0..1 scale, possibly outside it) through the forward- or inverse-gated net (the gates
        must be attached), or the original net (mode None), in the Trainer's precision, as float32."""
        self.gates.mode = mode
        with self.autocast():
            return self.classify(x, self.net).float()

    # -- one round ---------------------------------------------------------------------------------------------
    def fit_perturbation(self, x: Tensor, ref_clean: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample perturbations from zero: AdamW on agreement(inverse(x + d), original(x + d)) +
        disagreement(original(x + d), original(x)), each step followed by the clamp to +-bound. Returns delta and
        the two terms of the last step (before its update)."""
        h = self.hparams
        delta = torch.zeros_like(x, requires_grad=True)
        optimizer = torch.optim.AdamW([delta], lr=h.perturbation_lr, weight_decay=h.weight_decay)
        terms = x.new_zeros(2)
        for _ in range(h.perturbation_steps):
            perturbed = x + delta
            ref_perturbed = self.logits(perturbed, None)
            terms = torch.stack([agreement(self.logits(perturbed, "inverse"), ref_perturbed),
                                 disagreement(ref_perturbed, ref_clean)])
            (grad,) = torch.autograd.grad(terms.sum(), [delta])  # the gates get no gradient here
            delta.grad = grad
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-h.perturbation_bound, h.perturbation_bound)
        return delta.detach(), terms.detach()

    def mask_terms(self, x: Tensor, ref_clean: Tensor, delta: Tensor | None, l1_weight: float) -> dict[str, Tensor]:
        """The outer loss's terms on a batch: without delta, the initial phase's (clean terms + L1)."""
        if delta is None:
            terms = {"masked_clean": agreement(self.logits(x, "forward"), ref_clean),
                     "inverse_clean": disagreement(self.logits(x, "inverse"), ref_clean)}
        else:
            perturbed = x + delta
            with torch.no_grad():
                ref_perturbed = self.logits(perturbed, None)
            both = torch.cat([x, perturbed])  # eval mode: one pass of 2B images is two passes of B
            masked_clean, masked_perturbed = self.logits(both, "forward").chunk(2)
            inverse_clean, inverse_perturbed = self.logits(both, "inverse").chunk(2)
            terms = {"masked_clean": agreement(masked_clean, ref_clean),
                     "masked_perturbed": agreement(masked_perturbed, ref_clean),  # trigger proxies -> clean label
                     "inverse_perturbed": agreement(inverse_perturbed, ref_perturbed),
                     "inverse_clean": disagreement(inverse_clean, ref_clean),
                     "inverse_perturbed_flips": disagreement(inverse_perturbed, ref_clean)}
        terms["l1"] = l1_weight * self.gates.l1()
        return terms

    def run_phase(self, x_all: Tensor, rounds: int, l1_weight: float, perturb: bool) -> dict[str, Any]:
        """Up to `rounds` rounds (draw a batch, fit delta if `perturb`, one mask step), early-stopped on the
        round's loss; returns the phase's record."""
        h = self.hparams
        optimizer = torch.optim.AdamW(self.gates.parameters(), lr=h.mask_lr, weight_decay=h.weight_decay)
        stop = EarlyStop(h.patience, h.improvement)
        per_round: list[Tensor] = []
        names: list[str] = []
        for _ in range(rounds):
            x = x_all[torch.randperm(len(x_all), device=x_all.device)[: self.batch_size]]  # unique within a batch
            with torch.no_grad():
                ref_clean = self.logits(x, None)
            delta, inner = self.fit_perturbation(x, ref_clean) if perturb else (None, x.new_full((2,), math.nan))
            terms = self.mask_terms(x, ref_clean, delta, l1_weight)
            loss = torch.stack(list(terms.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.gates.clamp_()
            names = list(terms)
            per_round.append(torch.cat([loss.detach().view(1), *(t.detach().view(1) for t in terms.values()), inner]))
            if stop.update(float(loss.detach())):  # the one host sync per round (after ~46 passes), for the early stop
                break
        table = torch.stack(per_round).cpu().tolist() if per_round else []
        return {
            "max_rounds": rounds, "rounds": len(table), "stopped_early": len(table) < rounds, "l1_weight": l1_weight,
            "best_loss": stop.best if table else None, "loss": [row[0] for row in table],
            "last_terms": dict(zip(names, table[-1][1:-2])) if table else {},
            "last_perturbation": ({"inverse_agrees": table[-1][-2], "original_flips": table[-1][-1]}
                                  if table and perturb else None),
        }

    # -- the method --------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        h = self.hparams
        self.refuse_float16("IMS's hand-written mask and perturbation loops")
        x_all, _ = self.mitigation_data("train")
        if len(x_all) == 0:
            raise ValueError("IMS needs D_m images; data.init_args.spc (or ratio) selects none")
        x_all = to_unit(x_all)  # the perturbations live in pixel space (0..1), before the normalisation
        self.net.eval()
        phases = {"initial": (h.initial_rounds, h.l1_weight, False), "minimize": (h.minimize_rounds, 0.0, True),
                  "minimize_l1": (h.minimize_rounds, h.l1_weight, True)}
        with self.gates.attached(self.net), torch.enable_grad():
            for name, (rounds, l1_weight, perturb) in phases.items():
                self.history[name] = self.run_phase(x_all, rounds, l1_weight, perturb)
        self.history["dm_images"] = len(x_all)
        self.history["batch"] = min(len(x_all), self.batch_size)

    @torch.no_grad()
    def finish(self) -> None:
        forward = [g.detach() for g in self.gates.values()]
        sizes = [len(g) for g in forward]
        # the gates are not synced by DDP: every process folds rank 0's
        flat = self.trainer.strategy.broadcast(torch.cat(forward), src=0)
        forward = list(flat.split(sizes))
        self.gates.fold_into(self.net, forward)
        inverse = torch.cat([g.detach() for g in self.gates.values(inverse=True)])
        selection = torch.cat([s.detach() for s in self.gates.selections])
        self._facts = {
            "folded": f"forward soft gate a + s (1 - a), a = sigmoid({self.gates.k:g} (m - 0.5)), into every Conv2d's "
                      f"weight and bias",
            "early_stop_signal": "the phase's total loss on its round's D_m batch, before that round's mask step",
            "convs": len(forward), "channels": len(flat),
            "channels_off": int((flat < 0.5).sum()), "channels_shared": int((selection > 0.5).sum()),
            "channels_inverse_off": int((inverse < 0.5).sum()),
            "gate": mask_summary(dict(zip(self.gates.names, forward))),
            "selection_mean": float(selection.mean()),
        }

    def info(self) -> dict[str, Any]:
        return {**self.history, **self._facts}
