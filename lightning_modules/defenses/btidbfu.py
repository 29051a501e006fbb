"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, unlearning variant (Xu, Huang, Li, Qin, Ren,
"Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign Features", ICLR 2024).

Re-implemented from the paper and the authors' code (facts only): the survey fork's script fails at import (its UNet
and model wrappers are missing). A UNet G is pretrained to be a near-identity (`preround`), then `nround` rounds of
(1) a tanh-bounded mask on the classifier head's input features: masked features keep the label, the complement
loses it; (2) G keeps the masked (benign) features and changes the rest within an image-MSE bound, from round 2 also
pushed to the target detected after round 1; (3) `ul_round` epochs of unlearning (Lightning's loop): ~10% of each
batch replaced by G(x), CE(true label) + MSE(features of that batch, of its clean version).
Differs from the reference (details: docs/fidelity.md, "BTI-DBF(U)"): the head's input, not ResNet's last conv map;
the classifier in eval mode for mask and G; G ends in a sigmoid (valid pixels; image MSE still in normalised units);
the pretraining's soft-label CE without the reference's double softmax.
Defaults: configs/defense/btidbfu.yaml (the authors' README; trainer.max_epochs = nround x ul_round = 150).
Cost: 50 + 5 x (20 + 30 + 30) = 450 epochs over D_m; per sample a pretraining or G epoch is G fwd + bwd and 2
classifier fwd + 1 bwd to the input, a mask epoch 1 classifier fwd, an unlearning epoch G fwd + 2 fwd + 1 bwd;
measured: benchmarks/README.md, "Newer defenses".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.transforms import to_unit
from lightning_modules.defenses.base import Defense
from lightning_modules.defenses.hooks import layer_setting

EPSILON = 1e-7  # tanh / (2 + eps) + 0.5 stays strictly inside (0, 1)
IDENTITY_SWITCH = 0.1  # pretraining: image-MSE weight 100 above this MSE, 0.01 below (the reference's)
Classify = Callable[[Tensor], Tensor]  # 0..1 pixels -> logits


# -- the generator ------------------------------------------------------------------------------------------------
def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU())


class UNet(nn.Module):
    """Image-to-image U-Net on 0..1 pixels: `blocks` max-pooled encoder stages of filters, 2 filters, ... channels, a
    bottleneck, mirrored decoder stages (transposed-conv upsampling, skip concatenation), a 1x1 conv and a sigmoid:
    every output is a valid image. Instance norm only, so train and eval mode compute the same.

    Args:
        channels: image channels.
        filters: channels of the first stage (doubled at each deeper one).
        blocks: encoder (and decoder) stages; the image side must be a multiple of 2**blocks, at least 2 x 2**blocks.
    """

    def __init__(self, channels: int = 3, filters: int = 32, blocks: int = 4) -> None:
        super().__init__()
        widths = [filters * 2**i for i in range(blocks)]
        self.down = nn.ModuleList(double_conv(cin, w) for cin, w in zip([channels, *widths], widths))
        self.bottleneck = double_conv(widths[-1], 2 * widths[-1])
        ups = list(reversed(widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in ups)
        self.merge = nn.ModuleList(double_conv(2 * w, w) for w in ups)
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], 1))
        return torch.sigmoid(self.out(x))


# -- reading and editing the classifier at its feature layer ------------------------------------------------------
def feature_input(net: nn.Module, head: str) -> str:
    """The module whose input is the feature vector the classifier head reads: the head's first Linear, or the
    nn.Sequential holding it when only parameter-free modules precede it there (EfficientNet's dropout: the features
    before it)."""
    parent_name, _, child = head.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else None
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        before = list(parent.children())[: names.index(child)]
        if all(next(m.parameters(), None) is None for m in before):
            return parent_name
    return head


@contextmanager
def at_features(net: nn.Module, layer: str, edit: Callable[[Tensor], Tensor] | None = None
                ) -> Iterator[dict[str, Tensor]]:
    """Within the block, store["features"] is the latest input of `layer`; with `edit`, `layer` (and what follows it)
    receives edit(features) instead (which may change the batch size: the head is per-sample)."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        store["features"] = inputs[0]
        return None if edit is None else (edit(inputs[0]), *inputs[1:])

    handle = net.get_submodule(layer).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def features_and_logits(classify: Classify, net: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    with at_features(net, layer) as store:
        logits = classify(x)
    return store["features"].float(), logits.float()


@contextmanager
def frozen(net: nn.Module) -> Iterator[nn.Module]:
    """`net` in eval mode without parameter gradients within the block, as it was after it."""
    was_training, flags = net.training, [p.requires_grad for p in net.parameters()]
    net.eval().requires_grad_(False)
    try:
        yield net
    finally:
        net.train(was_training)
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)


# -- the three inversion losses (the classifier frozen, in eval mode) ----------------------------------------------
def bounded_mask(raw: Tensor) -> Tensor:
    return torch.tanh(raw) / (2 + EPSILON) + 0.5


def image_mse(a: Tensor, b: Tensor, std: Tensor) -> Tensor:
    """MSE of 0..1 pixels a and b in the network's normalised input space (the reference's units)."""
    return ((a.float() - b.float()) / std).pow(2).mean()


def identity_loss(classify: Classify, net: nn.Module, layer: str, generator: nn.Module, x: Tensor, std: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 0: G(x) classified like x (soft-label CE), with x's features and close to x (image MSE weighted 100
    above IDENTITY_SWITCH, 0.01 below)."""
    gx = generator(x)
    features, logits = features_and_logits(classify, net, layer, torch.cat([x, gx]))
    (f_x, f_g), (l_x, l_g) = features.chunk(2), logits.chunk(2)
    soft = -(l_x.softmax(1) * l_g.log_softmax(1)).sum(1).mean()
    feature = F.mse_loss(f_g, f_x)
    norm = image_mse(gx, x, std)
    weight = torch.where(norm > IDENTITY_SWITCH, 100.0, 0.01)
    return soft + feature + weight * norm, {"soft_ce": soft, "feature_mse": feature, "image_mse": norm}


def mask_loss(classify: Classify, net: nn.Module, layer: str, mask: Tensor, x: Tensor, y: Tensor
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """CE of the label from the masked features minus CE from the complement (both halves in one forward pass)."""
    with at_features(net, layer, lambda f: torch.cat([mask * f, (1 - mask) * f])):
        kept, rest = classify(x).float().chunk(2)
    ce_kept, ce_rest = F.cross_entropy(kept, y), F.cross_entropy(rest, y)
    return ce_kept - ce_rest, {"ce_masked": ce_kept, "ce_complement": ce_rest}


def generator_loss(classify: Classify, net: nn.Module, layer: str, generator: nn.Module, mask: Tensor, x: Tensor,
                   std: Tensor, norm_bound: float, feat_bound: float, benign_weight: float, target: int | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """-MSE of the complement features + benign_weight x MSE of the masked ones between G(x) and x; only the image MSE
    when it exceeds `norm_bound` or the masked-feature MSE exceeds `feat_bound`; + CE(G(x), target) once detected."""
    gx = generator(x)
    features, logits = features_and_logits(classify, net, layer, torch.cat([x, gx]))
    f_x, f_g = features.chunk(2)
    benign = F.mse_loss(mask * f_g, mask * f_x)
    backdoor = F.mse_loss((1 - mask) * f_g, (1 - mask) * f_x)
    norm = image_mse(gx, x, std)
    bounded = (norm > norm_bound) | (benign > feat_bound)
    loss = torch.where(bounded, norm, benign_weight * benign - backdoor)
    if target is not None:
        l_g = logits[len(x):]
        loss = loss + F.cross_entropy(l_g, torch.full((len(x),), target, device=x.device))
    return loss, {"benign_mse": benign, "backdoor_mse": backdoor, "image_mse": norm, "bounded": bounded.float()}


@torch.no_grad()
def detect_target(classify: Classify, generator: nn.Module, x: Tensor, noise: Tensor, num_classes: int,
                  batch_size: int) -> Tensor:
    """How often each class is predicted on G(x + noise x N(0, 1)) over 0..1 pixels x: the target is the argmax."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    for xb in x.split(batch_size):
        z = generator(xb + noise * torch.randn_like(xb))
        counts += torch.bincount(classify(z).argmax(1), minlength=num_classes)
    return counts


def replaced_count(batch: int, fraction: float) -> int:
    """Images of a batch replaced by G(x) in unlearning: int(fraction x batch + 1), the reference's (at most all)."""
    return min(batch, int(fraction * batch + 1))


class BTIDBFU(Defense):
    """Args:
        preround: epochs of G's near-identity pretraining.
        nround: rounds of (mask, G, unlearning).
        mround, uround: epochs of the mask and of G per round.
        ul_round: unlearning epochs per round; trainer.max_epochs must be nround x ul_round.
        generator_filters, generator_blocks: G's first-stage channels and its number of stages.
        generator_lr: Adam of G (one for the pretraining, one kept over the rounds).
        mask_lr: Adam of the mask (fresh, from N(0, 1) pre-tanh values, every round).
        norm_bound, feat_bound: G minimises only the image MSE (normalised units) while it exceeds norm_bound or the
            masked-feature MSE exceeds feat_bound.
        benign_weight: weight of the masked-feature MSE in G's loss.
        noise: std of the Gaussian noise (normalised units) added to D_m before G when the target is detected.
        poison_fraction: int(fraction x batch + 1) images of each unlearning batch are replaced by G(x).
        feature_weight: weight of MSE(features of that batch, of its clean version) in the unlearning loss.
        optimizer, lr, momentum: the unlearning optimiser over all weights ("adam": Adam(lr); "sgd": SGD(lr,
            momentum)).
        feature_layer: the module whose input is the masked feature vector (or a table of them by backbone class
            name); None: the input of the backbone's classifier head (`layer_roles.head`, before a leading dropout).
        (and the `Defense` arguments: backdoored, result_file, save_defended, channels_last)
    """

    family = "fine-tuning"
    measure_dm_acc = True
    display_name = "BTI-DBF(U)"
    # two rounds (the second with the target push) of one epoch per stage, a 4-filter 2-stage G
    smoke_args = ["--trainer.max_epochs", "2", "--model.nround", "2", "--model.ul_round", "1", "--model.preround",
                  "1", "--model.mround", "1", "--model.uround", "1", "--model.generator_filters", "4",
                  "--model.generator_blocks", "2"]

    def __init__(
        self,
        backdoored: str,
        preround: int = 50,
        nround: int = 5,
        mround: int = 20,
        uround: int = 30,
        ul_round: int = 30,
        generator_filters: int = 32,
        generator_blocks: int = 4,
        generator_lr: float = 1e-3,
        mask_lr: float = 0.01,
        norm_bound: float = 0.3,
        feat_bound: float = 3.0,
        benign_weight: float = 0.01,
        noise: float = 0.03,
        poison_fraction: float = 0.1,
        feature_weight: float = 1.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-4,
        momentum: float = 0.0,
        feature_layer: str | dict[str, str] | None = None,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.check(
            ("preround", preround, preround >= 0, ">= 0"), ("nround", nround, nround >= 1, ">= 1"),
            ("mround", mround, mround >= 1, ">= 1"), ("uround", uround, uround >= 1, ">= 1"),
            ("ul_round", ul_round, ul_round >= 1, ">= 1"),
            ("generator_filters", generator_filters, generator_filters >= 1, ">= 1"),
            ("generator_blocks", generator_blocks, generator_blocks >= 1, ">= 1"),
            ("generator_lr", generator_lr, generator_lr > 0, "> 0"), ("mask_lr", mask_lr, mask_lr > 0, "> 0"),
            ("norm_bound", norm_bound, norm_bound > 0, "> 0"), ("feat_bound", feat_bound, feat_bound > 0, "> 0"),
            ("benign_weight", benign_weight, benign_weight >= 0, ">= 0"), ("noise", noise, noise >= 0, ">= 0"),
            ("poison_fraction", poison_fraction, 0 <= poison_fraction < 1, "in [0, 1)"),
            ("feature_weight", feature_weight, feature_weight >= 0, ">= 0"),
            ("optimizer", optimizer, optimizer in ("adam", "sgd"), "'adam' or 'sgd'"),
            ("lr", lr, lr > 0, "> 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            finite=True,
        )
        super().__init__(backdoored, result_file, save_defended, channels_last)
        self.save_hyperparameters()
        self.automatic_optimization = False
        size = self.spec.image_size
        self.check(("generator_blocks", generator_blocks, size % 2**generator_blocks == 0 and size >> generator_blocks
                    >= 2, f"a U-Net depth that halves the {size}-pixel images to at least 2 pixels"))
        config = f"configs/defense/{type(self).__module__.rsplit('.', 1)[-1]}.yaml"
        self.feature_layer = str(layer_setting(self.net, feature_layer, lambda r: feature_input(self.net, r.head[0]),
                                               "feature layer (the classifier head's input)", config))
        if self.feature_layer not in dict(self.net.named_modules()):
            raise ValueError(f"{type(self).__name__}: {type(self.net).__name__} has no module {self.feature_layer!r}; "
                             f"fix feature_layer in {config}")
        self.target: int | None = None
        self.history: dict[str, Any] = {"pretrain": [], "rounds": [], "unlearn": []}
        self._generator_optimizer: torch.optim.Optimizer | None = None

    def setup(self, stage: str) -> None:
        h, epochs = self.hparams, self.trainer.max_epochs
        if stage == "fit" and epochs != h.nround * h.ul_round:
            raise ValueError(f"{type(self).__name__}: trainer.max_epochs ({epochs}) must be nround x ul_round "
                             f"({h.nround} x {h.ul_round} = {h.nround * h.ul_round}): the unlearning epochs")

    @property
    def generator(self) -> nn.Module:
        return self.references["generator"]

    # -- inversion: hand-written loops on the frozen classifier --------------------------------------------------
    def fit_epoch(self, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
                  optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One epoch of `optimizer` steps on loss_fn(0..1 pixels, labels) over augmented batches of D_m; returns the
        epoch's mean terms (one host sync)."""
        sums: dict[str, Tensor] = {}
        for xb, yb in self.batches(x, y, shuffle=True, augment=True):
            with self.autocast():
                loss, terms = loss_fn(to_unit(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * len(yb)
        return dict(zip(sums, (torch.stack(list(sums.values())) / max(1, len(y))).tolist()))

    def prepare(self) -> None:
        self.refuse_float16("BTI-DBF's generator and mask training")
        h = self.hparams
        generator = self.reference("generator", UNet(len(self.spec.mean), h.generator_filters, h.generator_blocks)
                                   .to(self.device))
        x, y = self.mitigation_data("train")
        optimizer = torch.optim.Adam(generator.parameters(), lr=h.generator_lr)
        with frozen(self.net), torch.enable_grad():
            for _ in range(h.preround):
                self.history["pretrain"].append(self.fit_epoch(x, y, lambda xb, yb: identity_loss(
                    self, self.net, self.feature_layer, generator, xb, self.normalize.std), optimizer))
        self._generator_optimizer = torch.optim.Adam(generator.parameters(), lr=h.generator_lr)

    def invert(self, round_: int) -> None:
        """One round's mask and G; after the first, the detected target."""
        self.refuse_float16("BTI-DBF's generator and mask training")
        h, generator, layer, std = self.hparams, self.generator, self.feature_layer, self.normalize.std
        x, y = self.mitigation_data("train")
        entry: dict[str, Any] = {"round": round_}
        with frozen(self.net), torch.enable_grad():
            with torch.no_grad(), at_features(self.net, layer) as store:
                self(x[:1])
            raw = torch.randn(store["features"].shape[1:], device=self.device, requires_grad=True)
            optimizer = torch.optim.Adam([raw], lr=h.mask_lr)
            for _ in range(h.mround):
                entry["mask"] = self.fit_epoch(
                    x, y, lambda xb, yb: mask_loss(self, self.net, layer, bounded_mask(raw), xb, yb), optimizer)
            mask = bounded_mask(raw).detach()
            entry["mask"] |= {"mean": float(mask.mean()), **self.masked_accuracy(x, y, mask)}
            generator.train()
            for _ in range(h.uround):
                entry["generator"] = self.fit_epoch(x, y, lambda xb, yb: generator_loss(
                    self, self.net, layer, generator, mask, xb, std, h.norm_bound, h.feat_bound, h.benign_weight,
                    self.target), self._generator_optimizer)
            generator.eval()
            if round_ == 0:
                with self.autocast():
                    counts = detect_target(self, generator, to_unit(x), h.noise * std, self.spec.num_classes,
                                           self.batch_size)
                self.target = int(counts.argmax())
                entry |= {"detected_target": self.target, "target_share": float(counts.max()) / max(1, len(x))}
        # one generator and target for all processes
        generator.load_state_dict(self.trainer.strategy.broadcast(generator.state_dict(), src=0))
        self.target = self.trainer.strategy.broadcast(self.target, src=0)
        self.history["rounds"].append(entry)

    @torch.no_grad()
    def masked_accuracy(self, x: Tensor, y: Tensor, mask: Tensor) -> dict[str, float]:
        """D_m accuracy (no augmentation) of the head on the masked features and on their complement."""
        correct = torch.zeros(2, device=x.device)
        with self.autocast():
            for xb, yb in self.batches(x, y):
                with at_features(self.net, self.feature_layer, lambda f: torch.cat([mask * f, (1 - mask) * f])):
                    pred = self(xb).argmax(1).view(2, -1)
                correct += (pred == yb).sum(1)
        masked, complement = (correct / max(1, len(y))).tolist()
        return {"masked_acc": masked, "complement_acc": complement}

    # -- unlearning: Lightning's loop -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.current_epoch % self.hparams.ul_round == 0:
            self.invert(self.current_epoch // self.hparams.ul_round)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        if h.optimizer == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=h.lr)
        return torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum)

    @torch.no_grad()
    def reversed_batch(self, clean: Tensor) -> Tensor:
        """`clean` (0..1 pixels) with `replaced_count` random images replaced by G(x)."""
        count = replaced_count(len(clean), self.hparams.poison_fraction)
        idx = torch.randperm(len(clean), device=clean.device)[:count]
        mixed = clean.clone()
        mixed[idx] = self.generator(clean[idx]).to(mixed.dtype)
        return mixed

    def unlearning_loss(self, clean: Tensor, mixed: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, CE of the mixed batch with true labels, feature MSE to the clean batch); two forward passes in train
        mode, as the reference (one when feature_weight is 0)."""
        weight = self.hparams.feature_weight
        if weight == 0:
            ce = F.cross_entropy(self(mixed).float(), y)
            return ce, ce, torch.zeros_like(ce)
        f_clean, _ = features_and_logits(self, self.net, self.feature_layer, clean)
        f_mixed, logits = features_and_logits(self, self.net, self.feature_layer, mixed)
        ce, feature = F.cross_entropy(logits, y), F.mse_loss(f_mixed, f_clean)
        return ce + weight * feature, ce, feature

    @contextmanager
    def loss_point(self) -> Iterator[None]:
        """Where the unlearning loss and its gradient are taken: here the current weights (PAM: near them)."""
        yield

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        clean = to_unit(self.augment(x))
        mixed = self.reversed_batch(clean)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        with self.loss_point():
            loss, ce, feature = self.unlearning_loss(clean, mixed, y)
            self.manual_backward(loss)
        optimizer.step()
        self.track(len(y), loss=loss, ce=ce, feature_mse=feature)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch
        self.history["unlearn"].append({"epoch": epoch, "round": epoch // self.hparams.ul_round,
                                        **self.epoch_means()})

    def info(self) -> dict[str, Any]:
        return {"feature_layer": self.feature_layer, "detected_target": self.target,
                "dm_acc_after": self.dm_acc_after, **self.history}
