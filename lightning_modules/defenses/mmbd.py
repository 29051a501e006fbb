"""MM-BD: maximum-margin backdoor defense (Wang, Mahmood, Kantarcioglu, Miller, IEEE S&P 2024), mitigation part.

Backdoors ride on abnormally large activations; MM-BD caps them. Every bounded layer l gets per-channel
upper bounds B_l, applied as min(activation, B_l) by a forward hook. The bounds start at the layer's single
largest activation on D_m fed with the training augmentation (copied to every channel), then only B is trained,
on augmented D_m batches, by
    min_B  mean((f_B(x) - f(x))^2)  +  lambda * sum_l ||B_l||_2
(logit MSE against the unbounded, frozen original, averaged over batch and classes), lambda = 0.5. After the
0-indexed epochs 10, 20, 30, 40, lambda is multiplied by 1.2 if the bounded model's D_m accuracy stayed above
the initial one minus 0.05 (absolute), else divided by 1.2. Adam lr 1e-3, 50 epochs, batch 256. Which accuracy
(`lam_signal`): "eval_acc" (default) the end-of-epoch eval-mode accuracy on D_m without augmentation, compared with
the unbounded model's; "running_train_acc" the fork's, the running accuracy of the epoch's augmented batches
(B changing within the epoch), compared with the same running accuracy of the unbounded model at initialisation.

Bounded layers (`layers[<backbone>]`: module types, minus modules under the excluded prefixes), as in the
survey's fork: PreActResNet18 every BN output (the ReLU after each BN is functional there, so the BN output
is bounded and the ReLU follows: relu(min(x, B)) = min(relu(x), relu(B)), the same as bounding the ReLU,
which is what the fork's relu-then-clamp hook computes, as long as B >= 0; a bound that the norm penalty drives
below 0 on a channel dead on D_m gives 0 here, where the fork's min(relu(x), B) would give the constant B); VGG19BN every ReLU except the two of the classifier;
EfficientNetB3 every SiLU (SE blocks included); MobileNetV3Large every Hardswish except the classifier's
*and every ReLU* (SE blocks included): the fork meant to bound its ReLUs but an exhausted generator skipped
them, which left features.1-6, the early ReLU-only blocks where a patch trigger first shows up, unbounded;
SmallCNN every ReLU.

The defended model is the backbone plus its bounds: `bounds` (one parameter per layer, shape (C, 1, 1) or
(C,)) and the hooks are created in `__init__` (a dry forward pass on a zero image gives the shapes), at +inf,
which bounds nothing, so the "before" measurement sees the backdoored model; `changes_architecture = True`,
and a checkpoint restores them. The original's logits come from the same network with the hooks switched
off (`unbounded()`), so no second copy of the weights is kept; the backbone stays in eval mode (running BN
statistics, no dropout, as in the fork) and its weights are frozen.

Differences from the survey's fork: the fork removes its hooks right after initialising them, so its bounds
never act and it returns the unchanged model (our hooks stay); the initial maxima come from one augmented pass
over D_m for all layers (the fork: one augmented pass per layer, i.e. another augmentation draw per layer;
`init_augment: false` takes them on un-augmented D_m, which caps tighter: on the review's toy model ASR 0.54
vs 0.91-0.94 with augmented maxima); the lambda signal (above); MobileNetV3 ReLUs are bounded (above; the
fork's set is `layers: {MobileNetV3Large: {types: [Hardswish], exclude: [classifier]}}`). The original MM-BD bounds only
the outputs of the stem, layer1 and layer2, from 8, with Adam lr 0.1, batch 200, 50 correctly classified
images per class and lambda adapted at epochs 20/30/40 on accuracy >= 95%. At these defaults a D_m of at
most 256 images (CIFAR-10 at SPC <= 25, GTSRB at SPC <= 5) gets one Adam step per epoch, so a bound moves by at most about
50 * 1e-3 = 0.05 from its initial value: most of the effect is the initial per-channel cap at the layer's
clean maximum (quickstart model: ASR 0.96 -> 0.91 at ACC 0.986 unchanged; with lr 0.1, ASR 0.04 but ACC 0.19).

Cost: per epoch two forward passes (bounded, and the unbounded reference) and one backward pass over D_m,
about 1.5 victim-training epochs on D_m, plus one accuracy pass over D_m at each lambda check. Measured on 2
CPU cores with the quickstart SmallCNN (width 32) on digits, SPC 10 (100 images, one batch per epoch): 0.32
s of CPU time per epoch on one thread, so about 16 core-seconds for the 50 epochs; the machine was shared
(load average ~20), where the full-default run took 597 s of wall time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import for_backbone

# Per backbone: {"types": module class names to bound, "exclude": module-name prefixes left alone}.
BOUNDED_LAYERS: dict[str, dict[str, list[str]]] = {
    "PreActResNet18": {"types": ["BatchNorm2d"], "exclude": []},
    "VGG19BN": {"types": ["ReLU"], "exclude": ["classifier"]},
    "EfficientNetB3": {"types": ["SiLU"], "exclude": []},
    "MobileNetV3Large": {"types": ["Hardswish", "ReLU"], "exclude": ["classifier"]},
    "SmallCNN": {"types": ["ReLU"], "exclude": []},
}


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
        layers: per backbone class name, {"types": [module class names], "exclude": [name prefixes]} of the
            activations to bound; None: `BOUNDED_LAYERS`.
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

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
        layers: dict[str, dict[str, list[str]]] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        checks = {"lr": lr > 0, "lam": lam >= 0, "lam_factor": lam_factor > 0, "lam_every": lam_every >= 1,
                  "accuracy_drop": 0 <= accuracy_drop <= 1}
        bad = [k for k, ok in checks.items() if not ok or not math.isfinite(self.hparams[k])]
        if bad:
            raise ValueError(f"MMBD: invalid {', '.join(f'{k}={self.hparams[k]}' for k in bad)}; expected lr > 0, "
                             f"lam >= 0, lam_factor > 0, lam_every >= 1, 0 <= accuracy_drop <= 1")
        if lam_signal not in ("eval_acc", "running_train_acc"):
            raise ValueError(f"MMBD: lam_signal={lam_signal!r}, expected 'eval_acc' or 'running_train_acc'")
        rule = for_backbone(BOUNDED_LAYERS if layers is None else layers, self.backdoor_record,
                            "MM-BD layer rule", "configs/defense/mmbd.yaml")
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

    # the backbone is frozen, BN statistics included: it stays in eval mode whatever Lightning asks
    def train(self, mode: bool = True) -> MMBD:
        super().train(mode)
        self.net.eval()
        return self

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
