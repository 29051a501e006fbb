"""MM-BD: maximum-margin backdoor defense, mitigation part (Wang, Mahmood, Kantarcioglu, Miller, "MM-BD:
Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin
Statistic", IEEE S&P 2024).

Per-channel upper bounds B_l on activations (forward hooks on the backbone's `layer_roles.activations`,
core/backbones/), initialised at each layer's maximum on augmented D_m and trained by logit MSE against the frozen
unbounded model + lambda ||B||; the bounds are parameters of the defended model (`changes_architecture`).
Pitfall: at the defaults a one-batch D_m gives one Adam step per epoch, so most of the effect is the initial cap.
Differs from the fork (details: docs/fidelity.md, "MM-BD"): the hooks stay (the fork removes them: a no-op);
one augmented pass initialises every layer; eval-mode lambda signal (`lam_signal`); MobileNetV3 ReLUs bounded.
Defaults: configs/defense/mmbd.yaml.
Cost: 2 fwd + 1 bwd per D_m sample per epoch (~1.5x FT), plus 1 fwd per sample at each lambda check;
measured: benchmarks/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones import LayerRoles
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting


def mmbd_rule(roles: LayerRoles) -> dict[str, list[str]]:
    """The MM-BD layer rule a backbone's layer roles give."""
    return {"types": list(roles.activations), "exclude": list(roles.activations_exclude)}


def bounded_layers(net: nn.Module, types: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the modules whose class name is in `types`, except those at or under an `exclude` prefix."""
    def excluded(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in exclude)

    return [n for n, m in net.named_modules() if type(m).__name__ in types and n and not excluded(n)]


@torch.no_grad()
def output_shapes(net: nn.Module, names: list[str], image_size: int) -> list[tuple[int, ...]]:
    """Per-sample output shape of each named module on a zero image (eval mode); each must run exactly once."""
    modules = dict(net.named_modules())
    seen: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen[n].append(tuple(o.shape[1:])))
               for n in names]
    was_training = net.training
    try:
        net.eval()
        net(torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    reused = [n for n, s in seen.items() if len(s) != 1]
    if reused:
        raise ValueError(f"modules {reused} run {[len(seen[n]) for n in reused]} times per forward pass; a bound "
                         f"per module needs modules that run once: exclude them in the MM-BD layers config")
    return [seen[n][0] for n in names]


class _HookState:
    """Shared by the hooks: whether bounds apply, and (while recording) each layer's running maximum."""

    def __init__(self) -> None:
        self.active = True
        self.maxima: list[Tensor] | None = None


class MMBD(Defense):
    """Args:
        lr: Adam learning rate of the bounds.
        lam: initial weight of the bounds' L2 norms (lambda).
        lam_factor: lambda is multiplied (accuracy kept) or divided (accuracy lost) by this at each check.
        lam_every: check every this many epochs (0-indexed epochs lam_every, 2 * lam_every, ...; never epoch 0).
        accuracy_drop: accuracy is kept while the D_m accuracy stays above the initial one minus this.
        lam_signal: which D_m accuracy decides lambda: "eval_acc" (eval mode, no augmentation, after the epoch) or
            "running_train_acc" (the running accuracy of the epoch's augmented batches, the fork's).
        init_augment: take the initial bounds on D_m with the training augmentation (the fork) or without.
        layers: {"types": [module class names], "exclude": [name prefixes]} of the activations to bound (or a
            table of them by backbone class name); None: the backbone's `layer_roles.activations` and
            `activations_exclude`.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "pruning"
    freeze_bn = True  # the backbone is frozen, BN statistics included
    display_name = "MM-BD"
    smoke_args = ["--trainer.max_epochs", "2", "--model.lam_every", "1"]

    changes_architecture = True

    def __init__(
        self,
        backdoored: str,
        lr: float = 1e-3,
        lam: float = 0.5,
        lam_factor: float = 1.2,
        lam_every: int = 10,
        accuracy_drop: float = 0.05,
        lam_signal: Literal["eval_acc", "running_train_acc"] = "eval_acc",
        init_augment: bool = True,
        layers: dict[str, list[str]] | dict[str, dict[str, list[str]]] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.check(
            ("lr", lr, lr > 0, "> 0"), ("lam", lam, lam >= 0, ">= 0"), ("lam_factor", lam_factor, lam_factor > 0, "> 0"),
            ("lam_every", lam_every, lam_every >= 1, ">= 1"),
            ("accuracy_drop", accuracy_drop, 0 <= accuracy_drop <= 1, "in [0, 1]"),
            ("lam_signal", lam_signal, lam_signal in ("eval_acc", "running_train_acc"),
             "'eval_acc' or 'running_train_acc'"),
            finite=True,
        )
        rule = layer_setting(self.net, layers, mmbd_rule, "MM-BD layer rule", "configs/defense/mmbd.yaml")
        unknown = set(rule) - {"types", "exclude"}
        if unknown or not rule.get("types"):
            raise ValueError(f"an MM-BD layer rule is {{types: [module class names], exclude: [prefixes]}}, got {rule}")
        self.layer_names = bounded_layers(self.net, rule["types"], rule.get("exclude", []))
        if not self.layer_names:
            raise ValueError(f"no module of {type(self.net).__name__} matches the MM-BD rule {rule}; "
                             f"fix it in configs/defense/mmbd.yaml")
        self.net.eval().requires_grad_(False)
        shapes = output_shapes(self.net, self.layer_names, self.spec.image_size)
        self.bounds = nn.ParameterList(
            nn.Parameter(torch.full((s[0],) + (1,) * (len(s) - 1), math.inf)) for s in shapes)
        self._bound_state = _HookState()
        modules = dict(self.net.named_modules())
        for i, name in enumerate(self.layer_names):
            modules[name].register_forward_hook(_bounding_hook(self.bounds, i, self._bound_state))
        self.lam = lam
        self.history: dict[str, Any] = {}
        self._correct: Tensor | int = 0  # this epoch's correct predictions (device) and images (lam_signal
        self._seen = 0                   # running_train_acc)

    @contextmanager
    def unbounded(self) -> Iterator[None]:
        """The original (backdoored) network: hooks pass activations through."""
        self._bound_state.active = False
        try:
            yield
        finally:
            self._bound_state.active = True

    @torch.no_grad()
    def prepare(self) -> None:
        h = self.hparams
        x, y = self.mitigation_data("train")
        self._bound_state.maxima = [torch.tensor(-math.inf, device=self.device) for _ in self.bounds]
        correct = torch.zeros((), device=self.device)
        try:
            with self.unbounded(), self.autocast():
                for xb, yb in self.batches(x, y, 512, augment=h.init_augment):
                    correct += (self(xb).argmax(1) == yb).sum()
        finally:
            maxima, self._bound_state.maxima = self._bound_state.maxima, None
        for bound, top in zip(self.bounds, maxima):
            bound.fill_(top)
        self.lam = h.lam
        if h.lam_signal == "eval_acc":
            with self.unbounded():
                initial = self.accuracy(x, y)
        else:  # the fork's reference: the unbounded model's accuracy on (augmented) D_m
            initial = float(correct) / max(1, len(y))
        self.history = {"initial_bounds": [float(m) for m in maxima], "initial_accuracy": initial,
                        "init_augment": h.init_augment, "lam_signal": h.lam_signal, "checks": []}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = self.augment(batch[0])
        with torch.no_grad(), self.unbounded():
            reference = self(x)
        logits = self(x)
        mse = F.mse_loss(logits.float(), reference.float())
        self._correct = self._correct + (logits.detach().argmax(1) == batch[1]).sum()  # on the device: no sync
        self._seen += len(x)
        norms = torch.stack([b.norm(2) for b in self.bounds]).sum()
        loss = mse + self.lam * norms
        self.log_dict({"train/loss": loss, "train/mse": mse, "train/bound_norm": norms},
                      on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._correct, self._seen = 0, 0

    def on_train_epoch_end(self) -> None:
        h = self.hparams
        if not is_check_epoch(self.current_epoch, h.lam_every):
            return
        if h.lam_signal == "eval_acc":
            accuracy = self.accuracy(*self.mitigation_data("train"))
        else:
            accuracy = float(self._correct) / max(1, self._seen)
        self.lam = next_lambda(self.lam, accuracy, self.history["initial_accuracy"], h.lam_factor, h.accuracy_drop)
        self.history["checks"].append({"epoch": self.current_epoch, "accuracy": accuracy, "lam": self.lam})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.bounds.parameters(), lr=self.hparams.lr)

    def finish(self) -> None:
        self.history["final_accuracy"] = self.accuracy(*self.mitigation_data("train"))

    def info(self) -> dict[str, Any]:
        layers = [{"name": n, "channels": b.shape[0], "mean": float(b.detach().mean()),
                   "min": float(b.detach().min()), "max": float(b.detach().max())}
                  for n, b in zip(self.layer_names, self.bounds)]
        return {**self.history, "lam_final": self.lam, "layers": layers}


def is_check_epoch(epoch: int, every: int) -> bool:
    """Lambda is adapted after the 0-indexed epochs every, 2 * every, ... (10, 20, 30, 40 in 50 epochs)."""
    return epoch > 0 and epoch % every == 0


def next_lambda(lam: float, accuracy: float, initial: float, factor: float, drop: float) -> float:
    """lam * factor while D_m accuracy stays above initial - drop (absolute), else lam / factor."""
    return lam * factor if accuracy > initial - drop else lam / factor


def _bounding_hook(bounds: nn.ParameterList, i: int, state: _HookState) -> Any:
    """A forward hook: min(output, bounds[i]) while active; records the output's maximum while recording.
    A closure, not a bound method, so copying the network does not copy the LightningModule."""
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        if state.maxima is not None:
            state.maxima[i] = torch.maximum(state.maxima[i], output.detach().max().float())
        if not state.active:
            return None
        return torch.minimum(output, bounds[i].to(output.dtype))
    return hook
