"""The defense contract: load the attacked model, measure before, run the method, measure after, record.

A defense is a LightningModule trained with `train.py fit` on the defender's data, a
`datamodules.MitigationDataModule` (D_m, optional D_v, and the benchmark's test sets). Subclasses implement
only their method, through three hooks and Lightning's usual ones:

- `prepare()`  runs once before training on D_m (after the "before" measurement): pruning, mask or
               trigger optimisation, statistics. Data-free or one-shot methods do all their work here
               and set `trainer.max_epochs: 0` in their config.
- `training_step` / `configure_optimizers`  the fine-tuning part; the default step is cross-entropy on
               augmented D_m batches (the FT baseline), the default optimiser is none.
- `finish()`   runs once after training, before the "after" measurement: thresholds chosen on D_v, masks
               applied to the weights.

The base measures ACC/ASR/RA on the test sets before and after (the defense itself never sees them: every
choice must use D_m / D_v, which `self.mitigation` exposes; "before" comes from the attacked model's cache when
another run measured it, evaluation.py), writes the result record atomically to `<run dir>/result.json` with the
seconds of each stage, logs it, and saves the defended model as `<run dir>/checkpoints/last.ckpt`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from core.metrics import AttackSuccessRate, RecoveryAccuracy, arr, der, rdr, rir
from datamodules.checkpoint import load_attacked
from datamodules.mitigation import MitigationDataModule
from datamodules.record import (
    BACKDOOR_KEY,
    DefenseResult,
    defense_result,
    plain,
    training_seed,
    write_json,
)
from lightning_modules.classifier import ImageClassifier
from lightning_modules.defenses import retuning
from lightning_modules.defenses.evaluation import EVAL_VERSION, BeforeCache

DEFENSE_KEY = "defense"


class Defense(ImageClassifier):
    """Args:
        backdoored: the attacked checkpoint, e.g. runs/<attack run>/version_0/checkpoints/last.ckpt; or a
            defended checkpoint of this defense, to restore it from that file alone (`load_defended` does; it
            carries its attacked model's record, and its own weights replace those read here).
        result_file: where the result record is written; None: <run dir>/result.json.
        save_defended: save the defended model as <run dir>/checkpoints/last.ckpt at the end of fit.
        channels_last: NHWC memory format.
    """

    # True when the defended model has parts outside `net` (NPD's polarizer, MM-BD's bounds): such a
    # checkpoint must be loaded with `load_defended`, not as a bare backbone.
    changes_architecture: ClassVar[bool] = False
    # Registry metadata (core/registry.py), declared by every defense: the survey's family ("pruning" or
    # "fine-tuning"), the name in tables and figures (None: the class name), and the fewest epochs / iterations
    # that still run every phase of the method (the tests run each defense with these CLI arguments).
    family: ClassVar[str]
    display_name: ClassVar[str | None] = None
    smoke_args: ClassVar[list[str]] = []
    # True: the network stays in eval mode (running BN statistics, no dropout) whatever Lightning asks
    freeze_bn: ClassVar[bool] = False
    # True: after finish(), `self.dm_acc_after` holds the defended model's accuracy on D_m (for `info`)
    measure_dm_acc: ClassVar[bool] = False

    def __init__(
        self,
        backdoored: str,
        result_file: str | None = None,
        save_defended: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__(channels_last=channels_last)
        self._clock: dict[str, float] = {"load": time.perf_counter()}
        run = load_attacked(backdoored, restore=f"{type(self).__module__}.{type(self).__qualname__}")
        self.backdoored, self.result_file, self.save_defended = backdoored, result_file, save_defended
        self.backdoor_record = run.record
        self.bind_data(run.spec)
        self.set_net(run.net.train())
        self.result: dict[str, Any] | None = None
        self._before: dict[str, float] | None = None
        self.before_source: str | None = None  # "measured" or "cache" (evaluation.py)
        # frozen networks the method compares against (a teacher, the original model): not submodules, so never
        # checkpointed nor trained; they follow the module's device
        self.references: dict[str, nn.Module] = {}
        self._epoch_sums: dict[str, Tensor] = {}
        self._epoch_count = 0
        self.dm_acc_after: float | None = None
        self._retune_references: dict[str, Any] | None = None
        self._reference_seconds = 0.0  # retuning the reference models, inside "before"'s clock

    # -- what subclasses implement -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Work before training on D_m (default: none)."""

    def finish(self) -> None:
        """Work after training on D_m, before the 'after' measurement (default: none)."""

    def info(self) -> dict[str, Any]:
        """Method-specific facts for the result record (pruned neurons, chosen threshold, ...)."""
        return {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.cross_entropy_step(x, y, augment=True)

    def configure_optimizers(self) -> Any:
        return None

    # -- helpers for subclasses ---------------------------------------------------------------------------
    def check(self, *rules: tuple[str, Any, bool, str], finite: bool = False) -> None:
        """Validate constructor arguments: each rule is (name, value, ok, what is expected). One ValueError names
        every argument that fails, its value, the rule and the config key. `finite`: numbers must also be finite."""
        bad = [(name, value, rule) for name, value, ok, rule in rules
               if not ok or (finite and isinstance(value, (int, float)) and not math.isfinite(value))]
        if bad:
            config = f"configs/defense/{type(self).__module__.rsplit('.', 1)[-1]}.yaml"
            raise ValueError(f"{type(self).__name__}: invalid "
                             + "; ".join(f"{name}={value!r} (expected {rule})" for name, value, rule in bad)
                             + f"; fix {', '.join(f'model.init_args.{name}' for name, _, _ in bad)} ({config})")

    def reference(self, name: str, net: nn.Module) -> nn.Module:
        """Hold `net` as reference `name` (`self.references[name]`) and return it."""
        self.references[name] = net
        return net

    def track(self, n: int | None = None, **terms: Tensor) -> None:
        """Add a batch's terms to this epoch's sums, on the device (no host sync per batch): batch means weighted by
        the batch's n images, or with n None totals (counts) added as they are."""
        for k, v in terms.items():
            self._epoch_sums[k] = self._epoch_sums.get(k, 0) + (v.detach() if n is None else v.detach() * n)
        self._epoch_count += n or 0

    def epoch_sums(self) -> tuple[dict[str, Tensor], int]:
        """This epoch's tracked sums and image count, then start afresh: call it once, in on_train_epoch_end."""
        sums, count = self._epoch_sums, self._epoch_count
        self._epoch_sums, self._epoch_count = {}, 0
        return sums, count

    def epoch_means(self) -> dict[str, float]:
        """This epoch's tracked terms averaged over its images, then start afresh (once, in on_train_epoch_end)."""
        sums, count = self.epoch_sums()
        return {k: float(v) / max(1, count) for k, v in sums.items()}

    def train(self, mode: bool = True) -> Defense:
        super().train(mode)
        if self.freeze_bn and self.net is not None:
            self.net.eval()
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Defense:
        super()._apply(fn, *args, **kwargs)
        for net in getattr(self, "references", {}).values():
            net._apply(fn, *args, **kwargs)
        return self

    @property
    def mitigation(self) -> MitigationDataModule:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, MitigationDataModule):
            raise RuntimeError(f"{type(self).__name__} runs on a datamodules.MitigationDataModule (the defender's data)")
        return datamodule

    @property
    def batch_size(self) -> int:
        """The defender's batch size (data.batch_size), for hand-written loops."""
        return self.mitigation.batch_size

    def mitigation_data(self, part: str = "train") -> tuple[Tensor, Tensor]:
        """D_m minus D_v ("train") or D_v ("val") as uint8 images and labels, on this module's device."""
        x, y = self.mitigation.tensors(part)
        return x.to(self.device), y.to(self.device)

    def frozen_copy(self, net: nn.Module | None = None) -> nn.Module:
        """An eval-mode copy without gradients (the original backdoored model, a teacher, ...)."""
        copy_ = copy.deepcopy(net if net is not None else self.net).eval()
        for p in copy_.parameters():
            p.requires_grad_(False)
        return copy_

    def refuse_float16(self, what: str) -> None:
        """Hand-written loops have no loss scaler: refuse float16 precisions (bf16 needs none)."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision.startswith("16"):
            raise ValueError(f"{type(self).__name__}: {what} runs without a loss scaler, so float16 gradients could "
                             f"underflow; use trainer.precision bf16-mixed or 32 (got {precision})")

    def autocast(self) -> Any:
        """The Trainer's precision context (bf16 autocast under bf16-mixed) for hand-written loops."""
        return self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()

    def classify(self, x: Tensor, net: nn.Module | None = None) -> Tensor:
        """Logits of pixels x (uint8 or 0..1 float) through `net` (default: the defended one)."""
        if net is None:
            return self(x)
        x = self.normalize(x)
        return net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def batches(
        self, x: Tensor, y: Tensor, batch_size: int | None = None, shuffle: bool = False, augment: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches of (x, y) for hand-written loops (batch_size None: data.batch_size); `augment` applies the
        training augmentation."""
        batch_size = batch_size or self.batch_size
        order = torch.randperm(len(x), device=x.device) if shuffle else torch.arange(len(x), device=x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx]
            yield (self.augment(xb) if augment else xb), y[idx]

    def finetune_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, ascent: bool = False
    ) -> tuple[Tensor, Tensor]:
        """One epoch of a hand-written fine-tuning loop outside Lightning's (NAD's teacher, RNP's unlearning): `model`
        in train mode, cross-entropy on shuffled, augmented batches of (x, y) (`ascent`: its negative), one
        `optimizer` step per batch, the forward in the Trainer's precision context. The backward is plain: the
        optimizer is not the Trainer's, so float16 (which would need its loss scaler) is refused. Returns the
        epoch's sum of batch loss x batch size and its correct predictions, on the device."""
        self.refuse_float16("a hand-written fine-tuning loop")
        model.train()
        total = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device)
        with torch.enable_grad():
            for xb, yb in self.batches(x, y, shuffle=True, augment=True):
                with self.autocast():
                    logits = self.classify(xb, model).float()
                    loss = -F.cross_entropy(logits, yb) if ascent else F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
        return total, correct

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor, net: nn.Module | None = None, batch_size: int = 512) -> float:
        """Accuracy on (x, y) in eval mode (no augmentation): for choices made on D_m or D_v."""
        model = net if net is not None else self.net
        was_training = model.training
        model.eval()
        correct = torch.zeros((), device=x.device)
        with self.autocast():
            for xb, yb in self.batches(x, y, batch_size):
                correct += (self.classify(xb, net).argmax(1) == yb).sum()
        model.train(was_training)
        return float(correct) / max(1, len(y))

    # -- the flow -----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is not None:
            # the restored weights are already defended: "before" and prepare() would run on them
            raise ValueError(
                f"{type(self).__name__}: resuming a defense run (fit --ckpt_path {self.trainer.ckpt_path}) is not "
                f"supported; start it again without --ckpt_path (defenses are short; the grid runner redoes "
                f"interrupted runs), or evaluate the defended checkpoint with `train.py test`")
        self._clock["before"] = time.perf_counter()
        self._before, self.before_source = self.measure_before()
        self._retune_references, self._reference_seconds = retuning.reference_rows(self)
        self.train(self.training)  # Lightning keeps the modules' modes: this applies freeze_bn before training
        self._clock["method"] = time.perf_counter()
        self.prepare()

    def on_fit_end(self) -> None:
        # Lightning calls on_fit_end after its teardown has moved the module to the CPU: back to the run's device
        # for finish() and "after" (on a GPU both ran on the CPU before, ~60 s of PreAct-ResNet18 per run), and to
        # the CPU again at the end, where Lightning leaves a fitted module
        self.to(self.trainer.strategy.root_device)
        self.finish()
        if self.measure_dm_acc:
            self.dm_acc_after = self.accuracy(*self.mitigation_data("train"))
        self._clock["after"] = time.perf_counter()
        after = self.measure()
        self._clock["retune"] = time.perf_counter()
        retuned = retuning.retune_defended(self, self._retune_references)
        self._clock["end"] = time.perf_counter()
        self.result = self.result_record(self._before, after, retuned)
        if self.save_defended:  # first: a result.json marks a run whose outputs are all written
            self.trainer.save_checkpoint(self.checkpoint_dir() / "last.ckpt")
        if self.trainer.is_global_zero:
            write_json(self.result_path(), self.result)
            for logger in self.loggers:  # every one: the grid runner puts a CSVLogger before W&B
                logger.log_metrics(flat_metrics(self.result))
            b, a = self.result["before"], self.result["after"]
            rank_zero_info(
                f"{type(self).__name__}: ACC {b['acc']:.4f} -> {a['acc']:.4f}, ASR {b['asr']:.4f} -> {a['asr']:.4f}, "
                f"RA {b['ra']:.4f} -> {a['ra']:.4f}; ARR {self.result['arr']:.4f}, RDR {self.result['rdr']:.4f}; "
                f"{self.result['seconds']['method']:.1f} s; result: {self.result_path()}"
            )
        self.cpu()

    def measure_before(self) -> tuple[dict[str, float], str]:
        """The attacked model's ACC / ASR / RA: from the cache beside its checkpoint when a run measured them
        with the same weights, test sets and settings (evaluation.py), else measured here and cached."""
        data, trainer = self.mitigation, self.trainer
        cache = BeforeCache(self.backdoored, {
            "eval_version": EVAL_VERSION, "weights": self.net.state_dict(), "test_sets": data.test_digest(),
            "precision": str(trainer.precision), "device": self.device.type, "channels_last": self.channels_last,
            "batch_size": data.eval_batch_size, "torch": str(torch.__version__)})
        # the measurement over DataLoaders that this one replaced drew one seed per test set from the global
        # generator (DataLoader's _base_seed): the same draws here keep every method's random stream, and so its
        # results, what they were, and the same whether "before" is measured or read
        for _ in range(2 if self.backdoor_record["attack"] is not None else 1):
            torch.empty((), dtype=torch.int64).random_()
        cached = trainer.strategy.broadcast(cache.read() if trainer.is_global_zero else None)  # all ranks agree
        if cached is not None:
            return cached, "cache"
        start = time.perf_counter()
        before = self.measure()
        if trainer.is_global_zero:
            cache.write(before, time.perf_counter() - start)
        return before, "measured"

    @torch.no_grad()
    def measure(self, net: nn.Module | None = None) -> dict[str, float]:
        """ACC / ASR / RA on the benchmark's test sets (never used for a choice): their uint8 tensors in batches of
        data.eval_batch_size, on the device, no host sync until the end. Shards batches across processes; the
        metrics sum their counts over all of them. `net`: another network than the defended model (the retuned
        reference models)."""
        metrics = {
            "acc": MulticlassAccuracy(self.spec.num_classes, average="micro", validate_args=False),
            "asr": AttackSuccessRate(), "ra": RecoveryAccuracy(),
        }
        metrics = {k: m.to(self.device) for k, m in metrics.items()}
        rank, world = self.trainer.global_rank, self.trainer.world_size
        size = self.mitigation.eval_batch_size
        was_training = self.training, net.training if net is not None else False
        self.eval()
        if net is not None:
            net.eval()
        with self.autocast():
            for part in ("clean", "backdoor") if self.backdoor_record["attack"] is not None else ("clean",):
                tensors = [t.to(self.device) for t in self.mitigation.test_set(part)]
                for b, i in enumerate(range(0, len(tensors[0]), size)):
                    if b % world != rank:
                        continue
                    x, *labels = (t[i : i + size] for t in tensors)
                    logits = self.classify(x, net)
                    if part == "clean":
                        metrics["acc"].update(logits, labels[0])
                    else:
                        metrics["asr"].update(logits, labels[0])
                        metrics["ra"].update(logits, labels[1])
        self.train(was_training[0])
        if net is not None:
            net.train(was_training[1])
        has_backdoor = self.backdoor_record["attack"] is not None
        return {k: float(m.compute()) if (k == "acc" or has_backdoor) else float("nan") for k, m in metrics.items()}

    def result_record(self, before: dict[str, float], after: dict[str, float],
                      retuned: dict[str, Any] | None = None) -> DefenseResult:
        data, c = self.mitigation, self._clock
        return defense_result(
            self.backdoor_record, type(self).__name__, data.record(), before, after,
            scores={"arr": arr(before["acc"], after["acc"]), "rdr": rdr(before["acc"], after["ra"]),
                    "der": der(before["acc"], after["acc"], before["asr"], after["asr"]),
                    "rir": rir(before["acc"], after["acc"], before["ra"], after["ra"])},
            seconds={"load": c["before"] - c["load"], "before": c["method"] - c["before"] - self._reference_seconds,
                     "method": c["after"] - c["method"], "after": c.get("retune", c["end"]) - c["after"],
                     **({"retune": c["end"] - c["retune"] + self._reference_seconds} if retuned else {}),
                     "total": c["end"] - c["load"]},
            before_source=self.before_source,
            defense_info=self.info(),
            config={"model": {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                              "init_args": plain(dict(self.hparams))},
                    "data": plain(dict(data.hparams)) | {"record": data.record()},
                    "trainer": trainer_config(self.trainer)},
            attacked_checkpoint=str(self.backdoored),
            seed=training_seed(),
            retuned=retuned,
        )

    def result_path(self) -> Path:
        if self.result_file:
            return Path(self.result_file)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "result.json"

    def checkpoint_dir(self) -> Path:
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints"

    # -- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BACKDOOR_KEY] = self.backdoor_record
        checkpoint[DEFENSE_KEY] = {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "changes_architecture": self.changes_architecture,
            "result": plain(self.result) if self.result else None,
        }
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")


def trainer_config(trainer: L.Trainer) -> dict[str, Any]:
    return {
        "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
        "precision": str(trainer.precision), "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__,
    }


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    flat = {f"{stage}/{k}": v for stage in ("before", "after") for k, v in result[stage].items()}
    flat |= {k: result[k] for k in ("arr", "rdr", "der", "rir")}
    flat |= {f"seconds/{k}": v for k, v in result["seconds"].items()}
    retuned = result.get("retuned")
    if retuned:  # the retuning attack: the defended model's, then the reference rows'
        flat |= {f"retuned/{k}": retuned[k] for k in ("rta_acc", "rta_asr", "rta_ra", "poison_fraction")}
        for ref in ("backdoored", "clean"):
            flat |= {f"retuned/{ref}/{k}": v for k, v in (retuned["references"].get(ref) or {}).items()}
    return flat
