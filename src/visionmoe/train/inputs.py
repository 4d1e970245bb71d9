"""Turning a dataset config into model-ready batches.

Training and evaluation stream batches: a DataLoader reads and decodes one rank's share of each
batch (see :mod:`visionmoe.data.loader`), the uint8 batch travels to the device and becomes model
input there (resize, [-1, 1]), then the configured pad-crop / flip is applied.  Nothing is
decoded ahead of need and no float copy of a dataset is made.  :func:`to_tensors` still builds a
whole float split for the analysis tools that want one in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from visionmoe.data import DatasetSplits, ImageDataset, augment, load_dataset, to_model_input
from visionmoe.data.core import DatasetError, ImageSource, Subset
from visionmoe.data.loader import EvalBatches, SampleTransform, StepBatches, make_loader, read_batch
from visionmoe.data.ops import PreprocessConfig, Transform, mixup_for_step
from visionmoe.models.config import ViTConfig
from visionmoe.train.config import DataConfig, ExperimentConfig

log = logging.getLogger(__name__)
_SHOWN_SKIPS = 5  # name this many unreadable files, then only count them


@dataclass
class TensorSplit:
    """Model input ``x (N, C, H, W)`` float32 in [-1, 1] and labels ``y (N,)`` int64."""

    x: torch.Tensor
    y: torch.Tensor
    images: np.ndarray | None  # the uint8 originals of in-memory datasets, for reports

    def __len__(self) -> int:
        return len(self.y)


def augment_for_step(
    x: torch.Tensor,
    step: int,
    config: ExperimentConfig,
    *,
    positions: torch.Tensor | None = None,
    draw_size: int | None = None,
) -> torch.Tensor:
    """The configured crop / flip, drawn from ``(seed, step)`` so a resumed run sees the same.

    ``positions`` / ``draw_size``: ``x`` is part of a batch of ``draw_size`` images at those
    positions (one rank's share); each image gets the draw of its position in the whole batch.
    """
    if not (config.data.crop_padding or config.data.hflip):
        return x
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + step)
    return augment(
        x,
        generator,
        config.data.crop_padding,
        config.data.hflip,
        positions=positions,
        draw_size=draw_size,
    )


def load_splits(data: DataConfig) -> DatasetSplits:
    """Load the configured dataset; every kind but ``digits`` needs ``data.path``."""
    if data.kind != "digits" and data.path is None:
        raise ValueError(
            f"data.kind={data.kind!r} needs a dataset path: pass --data PATH "
            f"(or --set data.path=PATH)"
        )
    kwargs = {"test_fraction": data.test_fraction} if data.kind == "digits" else {}
    splits = load_dataset(data.kind, data.path, **kwargs)
    n = data.max_train_examples
    if n is not None and len(splits.train) > n:
        train = splits.train
        if isinstance(train, ImageDataset):
            train = ImageDataset(train.images[:n], train.labels[:n], train.class_names)
        else:
            train = Subset(train, np.arange(n))
        splits = DatasetSplits(name=splits.name, train=train, test=splits.test)
    return splits


def _in_memory(source: ImageSource) -> bool:
    while isinstance(source, Subset):
        source = source.base
    return isinstance(source, ImageDataset)


class ResizeTo:
    """Per-sample transform: resize to ``size x size`` (Pillow bilinear, antialiased)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: np.ndarray, generator: torch.Generator) -> np.ndarray:
        from PIL import Image

        if image.shape[:2] == (self.size, self.size):
            return image
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((self.size, self.size), Image.Resampling.BILINEAR))
        return out[..., None] if out.ndim == 2 else out


def sample_transform(
    source: ImageSource,
    model: ViTConfig,
    preprocess: PreprocessConfig | None = None,
    *,
    train: bool = False,
) -> SampleTransform | None:
    """The per-sample host transform: none for fixed-size in-memory data (resized on the device,
    as these recipes were tuned), a resize to the model's size for files of varied sizes.

    A ``preprocess`` that uses the V-MoE ops gives their :class:`Transform` instead: the
    training ops with ``train=True``, else the evaluation ops.
    """
    if preprocess is not None and preprocess.uses_ops:
        size = model.image_size
        ops = preprocess.train_ops(size) if train else preprocess.eval_ops(size)
        return Transform(ops=ops)
    return None if _in_memory(source) else ResizeTo(model.image_size)


def num_workers(data: DataConfig, source: ImageSource) -> int:
    """``data.num_workers``, or automatic: 0 for in-memory data, else up to 2 processes."""
    if data.num_workers is not None:
        return data.num_workers
    return 0 if _in_memory(source) else min(2, os.cpu_count() or 1)


def _model_input(batch: dict, model: ViTConfig, device: torch.device) -> torch.Tensor:
    images = batch["images"].to(device, non_blocking=True)
    return to_model_input(images, model.image_size, model.in_chans)


class TrainStream:
    """Model-ready training batches for steps ``start_step ..`` read by DataLoader workers.

    ``batch(step)`` must be called with consecutive steps (as the fit loop does); a jump starts
    a new loader at that step.  Unreadable images are named in the log (the first few) and
    counted in ``skipped``.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        source: ImageSource,
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config, self.source, self.device = config, source, torch.device(device)
        self.dataset = StepBatches(
            source,
            config.train.batch_size,
            config.train.seed,
            rank=rank,
            world_size=world_size,
            transform=sample_transform(source, config.model, config.preprocess, train=True),
            strict=config.data.strict,
        )
        self.mixup = config.preprocess.mixup_config()
        self.skipped = 0
        self._named: set[str] = set()
        self._iterator: Iterator[dict] | None = None
        self._next_step = -1

    def __len__(self) -> int:
        return len(self.source)

    def _loader(self, start: int) -> Iterator[dict]:
        data = self.config.data
        return make_loader(
            self.dataset,
            range(start, max(start + 1, self.config.train.steps)),
            num_workers=num_workers(data, self.source),
            pin_memory=self.device.type == "cuda",
            prefetch=data.prefetch,
            timeout_s=data.worker_timeout_s,
        )

    def note_skipped(self, messages: list[str]) -> None:
        """Count every skip; name each of the first few distinct files once (each epoch skips a
        corrupt file again)."""
        for message in messages:
            self.skipped += 1
            if message in self._named:
                continue
            if len(self._named) < _SHOWN_SKIPS:
                log.warning("skipped unreadable image: %s", message)
            elif len(self._named) == _SHOWN_SKIPS:
                log.warning("more unreadable images skipped; see data/skipped_images")
            self._named.add(message)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (n, C, H, W) float, y, positions (n,))`` of this rank at ``step``.

        ``y`` is ``(n,)`` class indices, or ``(n, num_classes)`` soft targets with mixup on.
        """
        if self._iterator is None or step != self._next_step:
            self.close()
            self._iterator = self._loader(step)
        batch = next(self._iterator)
        if batch["step"] != step:
            raise RuntimeError(f"loader returned step {batch['step']} for step {step}")
        self._next_step = step + 1
        self.note_skipped(batch["skipped"])
        x = _model_input(batch, self.config.model, self.device)
        positions = batch["positions"]
        x = augment_for_step(
            x, step, self.config, positions=positions, draw_size=self.config.train.batch_size
        )
        y = batch["labels"].to(self.device, non_blocking=True)
        if self.mixup.enabled:  # soft (N, num_classes) targets
            x, y = mixup_for_step(
                x,
                y,
                positions,
                self.mixup,
                seed=self.config.train.seed,
                step=step,
                num_classes=self.config.model.num_classes,
            )
        return x, y, positions

    def close(self) -> None:
        """Stop the loader's worker processes now rather than at garbage collection."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None


def eval_stream(
    config: ExperimentConfig,
    source: ImageSource,
    *,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-ready ``(x, y)`` evaluation batches of this rank's share, in the seeded order."""
    device = torch.device(device)
    dataset = EvalBatches(
        source,
        batch_size or config.train.eval_batch_size,
        config.train.seed,
        rank=rank,
        world_size=world_size,
        transform=sample_transform(source, config.model, config.preprocess),
        strict=config.data.strict,
    )
    loader = make_loader(
        dataset,
        range(len(dataset)),
        num_workers=num_workers(config.data, source),
        pin_memory=device.type == "cuda",
        prefetch=config.data.prefetch,
        timeout_s=config.data.worker_timeout_s,
    )
    for batch in loader:
        for message in batch["skipped"]:
            log.warning("skipped unreadable image: %s", message)
        yield _model_input(batch, config.model, device), batch["labels"].to(device)


def to_tensors(dataset: ImageSource, model: ViTConfig, chunk: int = 4096) -> TensorSplit:
    """The whole split as float model input, in dataset order (for analysis tools).

    Unreadable images are left out (and logged), so ``len`` may be below ``len(dataset)``.
    """
    if isinstance(dataset, ImageDataset):
        parts = [
            to_model_input(dataset.images[i : i + chunk], model.image_size, model.in_chans)
            for i in range(0, len(dataset), chunk)
        ]
        labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        return TensorSplit(torch.cat(parts), labels, dataset.images)
    transform = sample_transform(dataset, model)
    xs, ys = [], []
    for start in range(0, len(dataset), chunk):
        indices = np.arange(start, min(start + chunk, len(dataset)))
        batch = read_batch(dataset, indices, indices, (0, 0), transform, strict=False)
        if "error" in batch:
            raise DatasetError(batch["error"])
        for message in batch["skipped"]:
            log.warning("skipped unreadable image: %s", message)
        xs.append(to_model_input(batch["images"], model.image_size, model.in_chans))
        ys.append(batch["labels"])
    return TensorSplit(torch.cat(xs), torch.cat(ys), None)
