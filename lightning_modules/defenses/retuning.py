"""Post-purification robustness: the retuning attack (RtA; Min et al., "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024), an evaluation stage after "after".

A copy of the defended model (all its parameters, in train mode) is fine-tuned on the retuning set of
datamodules/retuning.py: plain SGD (lr 0.01, momentum 0.9, no weight decay, no schedule), batch 128, 5 epochs, the
training augmentation on the clean images only (the authors load the poisons with the test transform). Its ACC,
ASR and RA on the test sets are `rta_acc`, `rta_asr`, `rta_ra`. The same retuning of the attacked model ("no
defense") and of a clean model of the same dataset and backbone ("never backdoored") gives the reference rows,
on the same set (which skips the run's D_m): measured once per attacked model and D_m split and cached beside the
attacked model like "before" (evaluation.py). The retuning draws from its
own seeded random stream, so it changes no run's other numbers and repeats exactly.
QRA (same paper; optional, `qra: true`): a generator (an MLP 3HW -> 1024 -> 1024 -> 1024 -> 3HW, ReLU, tanh out,
times eps = 16/255 and clamped to it) reads the normalised image, as the models do, and adds an input-specific
perturbation to its pixels (0..1, the sum clamped to [0, 1]); it is trained (SGD lr 0.1, momentum 0.9, batch 128,
50 epochs) on 500 clean and 500 poisoned training images with alpha KL(defended(x + p) || retuned(x)) +
CE(clean(x + p), y), alpha 0.2: the defended model on x + p imitates its retuned self on x, while a clean model must
not be fooled. Reported: the defended model's ASR on the triggered test images + p and the share of non-target
clean test images + p classified as the target, and the same two for the clean model (does the perturbation
transfer, i.e. is it an adversarial example rather than the backdoor?). Differences: the authors' 500 poisoned
images come from their poisoned training folder, ours from the attack's poisoned training images whose label it
changes (fewer where fewer exist).
Cost: RtA: epochs x (set size) forward + backward passes (5 x 1,000 on CIFAR-10) and one test-set pass per model;
QRA: 50 x 1,000 generator steps through two frozen models, and two test-set passes per model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.checkpoint import load_attacked
from datamodules.poisoning import attack_labels
from datamodules.retuning import Retuning
from lightning_modules.defenses.evaluation import EVAL_VERSION, BeforeCache


@contextlib.contextmanager
def own_random_stream(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators seeded with `seed` inside the block and restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def retune(forward: Callable[[Tensor], Tensor], params: list[nn.Parameter], modules: list[nn.Module],
           data: tuple[Tensor, Tensor, Tensor], r: Retuning, augment: Callable[[Tensor], Tensor],
           autocast: Callable[[], Any]) -> None:
    """Fine-tune `params` in place: cross-entropy of `forward` on shuffled batches of (images, labels), clean images
    augmented, poisons as they are; `modules` in train mode. The caller keeps what it needs to restore."""
    x, y, poisoned = data
    for p in params:
        p.requires_grad_(True)
    for m in modules:
        nn.Module.train(m, True)  # past a defense's own train() (a frozen-BN method is retuned in train mode too)
    optimizer = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=0.0)
    with torch.enable_grad(), own_random_stream(r.seed, x.device):
        for _ in range(r.epochs):
            order = torch.randperm(len(x), device=x.device)
            for i in range(0, len(x), r.batch_size):
                idx = order[i : i + r.batch_size]
                xb, keep = x[idx], poisoned[idx].view(-1, 1, 1, 1)
                xb = torch.where(keep, xb, augment(xb))
                with autocast():
                    loss = F.cross_entropy(forward(xb).float(), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def rta_scores(scores: dict[str, float]) -> dict[str, float]:
    return {f"rta_{k}": v for k, v in scores.items()}


class Perturbation(nn.Module):
    """QRA's generator: image (pixels in 0..1) -> the image plus its perturbation, |p| <= eps, clamped to [0, 1];
    the MLP reads `normalize(image)` (the models' input normalisation, as the authors' generator reads its
    normalised test-transform images)."""

    def __init__(self, shape: tuple[int, ...], eps: float, normalize: nn.Module | None = None, width: int = 1024
                 ) -> None:
        super().__init__()
        n = math.prod(shape)
        self.eps = eps
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        p = (self.net(self.normalize(x)) * self.eps).clamp(-self.eps, self.eps).view_as(x)
        return (x + p).clamp(0.0, 1.0)


def train_perturbation(defended: Callable[[Tensor], Tensor], clean: Callable[[Tensor], Tensor], x: Tensor,
                       y: Tensor, teacher: Tensor, r: Retuning, autocast: Callable[[], Any],
                       normalize: nn.Module | None = None) -> Perturbation:
    """QRA's generator for (uint8 images x, true labels y, the retuned model's probabilities on x), reading
    `normalize(pixels)`; the two models' parameters must not require gradients."""
    with own_random_stream(r.seed, x.device):
        generator = Perturbation(tuple(x.shape[1:]), r.qra_eps, normalize).to(x.device)
        optimizer = torch.optim.SGD(generator.parameters(), lr=r.qra_lr, momentum=0.9)
        with torch.enable_grad():
            for _ in range(r.qra_epochs):
                order = torch.randperm(len(x), device=x.device)
                for i in range(0, len(x), 128):
                    idx = order[i : i + 128]
                    moved = generator(x[idx].float() / 255)
                    with autocast():
                        imitate = F.kl_div(F.log_softmax(defended(moved).float(), 1), teacher[idx],
                                           reduction="batchmean")
                        loss = r.qra_alpha * imitate + F.cross_entropy(clean(moved).float(), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    return generator.eval()


@torch.no_grad()
def qra_scores(classify: Callable[[Tensor], Tensor], generator: Perturbation, backdoor: tuple[Tensor, ...],
               clean: tuple[Tensor, Tensor], target: Tensor, batch_size: int, autocast: Callable[[], Any]
               ) -> dict[str, float]:
    """ASR on the triggered test images + p, and the share of clean test images + p (those not of the target
    class) classified as the target: `target` holds each clean image's attack label."""
    hits = {"asr": torch.zeros((), device=target.device), "clean_flip": torch.zeros((), device=target.device)}
    keep = clean[1] != target
    for name, x, labels in (("asr", backdoor[0], backdoor[1]), ("clean_flip", clean[0][keep], target[keep])):
        for i in range(0, len(x), batch_size):
            with autocast():
                logits = classify(generator(x[i : i + batch_size].float() / 255))
            hits[name] += (logits.argmax(1) == labels[i : i + batch_size]).sum()
    return {"asr": float(hits["asr"]) / max(1, len(backdoor[0])), "clean_flip": float(hits["clean_flip"]) /
            max(1, int(keep.sum()))}


# -- the stage, on a Defense (base.py calls these; `defense` is a fitted lightning_modules.defenses.Defense) ---------
def reference_rows(defense: Any) -> tuple[dict[str, Any] | None, float]:
    """The retuning attack on the attacked model ("no defense") and on the clean model ("never backdoored"), before
    the method runs, on the run's retuning set: from the cache beside the attacked checkpoint when a run retuned the
    same weights on the same set (the same D_m) with the same settings, else retuned here (on copies) and cached.
    Returns the rows (None: retuning is off) and the seconds spent retuning."""
    data, trainer = defense.mitigation, defense.trainer
    found = data.retuning()
    if found is None:
        return None, 0.0
    defense.refuse_float16("the retuning attack")
    tensors, _ = found
    r = data.retune
    with own_random_stream(r.seed, defense.device):  # building a network draws its initial weights
        clean = load_clean_model(r.clean_model, defense.backdoor_record) if r.clean_model else None
    cache = BeforeCache(defense.backdoored, {
        "eval_version": EVAL_VERSION, "weights": defense.net.state_dict(), "retuning": r.settings(), "set": tensors,
        "clean_weights": clean.state_dict() if clean is not None else None, "test_sets": data.test_digest(),
        "precision": str(trainer.precision), "device": defense.device.type, "channels_last": defense.channels_last,
        "batch_size": data.eval_batch_size, "torch": str(torch.__version__)}, kind="retuned")
    cached = trainer.strategy.broadcast(cache.read() if trainer.is_global_zero else None)
    if cached is not None:
        return {**cached, "source": "cache"}, 0.0
    with own_random_stream(r.seed, defense.device):
        # the attacked model afresh, not a copy of defense.net: a method may have hooked its own modules onto
        # that from construction (NPD's polarizer), which the copy would run and the retuning would train
        attacked = load_attacked(defense.backdoored).net
    mine = defense.net.state_dict()
    if any(k not in mine or not torch.equal(v.cpu(), mine[k].cpu()) for k, v in attacked.state_dict().items()):
        raise ValueError(f"retuning: {defense.backdoored} does not hold the weights the defense starts from; the "
                         f"reference rows retune the attacked model (name its checkpoint as model.backdoored)")
    start = time.perf_counter()
    rows = {"backdoored": retuned_copy(defense, on_device(defense, attacked), tensors),
            "clean": retuned_copy(defense, on_device(defense, clean), tensors) if clean is not None else None}
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        cache.write(rows, seconds)
    return {**rows, "source": "measured"}, seconds


def retuned_copy(defense: Any, net: nn.Module, data: tuple[Tensor, ...]) -> dict[str, float]:
    """rta_acc / rta_asr / rta_ra of `net` (a copy this changes) after the retuning attack."""
    retune(lambda x: defense.classify(x, net), list(net.parameters()), [net], data, defense.mitigation.retune,
           defense.augment, defense.autocast)
    return rta_scores(defense.measure(net))


def retune_defended(defense: Any, references: dict[str, Any] | None) -> dict[str, Any] | None:
    """The retuning attack on the defended model (all its parameters, train mode), after "after": its scores,
    settings, set, the reference rows and QRA's block for result.json's `retuned`; the defended weights are
    restored."""
    found = defense.mitigation.retuning()
    if found is None:
        return None
    tensors, info = found
    state = {k: v.detach().clone() for k, v in defense.state_dict().items()}
    params = list(defense.parameters())
    requires_grad, was_training = [p.requires_grad for p in params], defense.training
    r = defense.mitigation.retune
    retune(defense, params, [defense], tensors, r, defense.augment, defense.autocast)
    scores = rta_scores(defense.measure())
    teacher = probabilities(defense, defense.mitigation.qra_data()[0]) if r.qra else None  # the retuned model's
    defense.load_state_dict(state)
    for p, flag in zip(params, requires_grad, strict=True):
        p.requires_grad_(flag)
    defense.train(was_training)
    block = {**scores, **r.settings(), **info, "references": references}
    if teacher is not None:
        block["qra"] = query_reactivation(defense, teacher)
    return block


@torch.no_grad()
def probabilities(defense: Any, x: Tensor) -> Tensor:
    was_training = defense.training
    defense.eval()
    with defense.autocast():
        out = torch.cat([defense(x[i : i + 512]).float().softmax(1) for i in range(0, len(x), 512)])
    defense.train(was_training)
    return out


def query_reactivation(defense: Any, teacher: Tensor) -> dict[str, Any]:
    """QRA on the defended model, `teacher` its retuned self's probabilities on QRA's images: the defended and the
    clean model's ASR and clean flip rate with the generator's perturbations."""
    data, r, attack = defense.mitigation, defense.mitigation.retune, defense.backdoor_record["attack"]
    x, y = data.qra_data()
    with own_random_stream(r.seed, defense.device):
        clean = on_device(defense, load_clean_model(r.clean_model, defense.backdoor_record)).eval()
    params = [*defense.parameters(), *clean.parameters()]
    requires_grad, was_training = [p.requires_grad for p in params], defense.training
    for p in params:
        p.requires_grad_(False)
    defense.eval()
    generator = train_perturbation(defense, lambda v: defense.classify(v, clean), x, y, teacher, r, defense.autocast,
                                   copy.deepcopy(defense.normalize))
    backdoor, test = data.test_set("backdoor"), data.test_set("clean")
    target = attack_labels(test[1], attack["target"], attack["mode"], defense.spec.num_classes)
    size = data.eval_batch_size
    out = {**qra_scores(defense, generator, backdoor, test, target, size, defense.autocast),
           "clean_model": qra_scores(lambda v: defense.classify(v, clean), generator, backdoor, test, target, size,
                                     defense.autocast),
           "images": len(x), **r.qra_settings()}
    for p, flag in zip(params, requires_grad, strict=True):
        p.requires_grad_(flag)
    defense.train(was_training)
    return out


def on_device(defense: Any, net: nn.Module) -> nn.Module:
    net = net.to(defense.device)
    return net.to(memory_format=torch.channels_last) if defense.channels_last else net


def load_clean_model(path: str, attacked: dict[str, Any]) -> nn.Module:
    """The retuning attack's clean reference: a model trained without poisons on the attacked model's dataset, with
    its backbone."""
    run = load_attacked(path)
    attack = run.record["attack"]
    if attack is not None and len(attack["poison_indices"]):
        raise ValueError(f"retuning: clean_model {path} was trained with {len(attack['poison_indices'])} poisoned "
                         f"images; name a model trained without poisons (the grid's `clean` attack run)")
    for what, mine, theirs in (("dataset", attacked["data"]["dataset"], run.record["data"]["dataset"]),
                               ("backbone", attacked["backbone"], run.record["backbone"])):
        if mine != theirs:
            raise ValueError(f"retuning: clean_model {path} has {what} {theirs}, the attacked model {mine}; name a "
                             f"clean model of the attacked model's dataset and backbone")
    return run.net
