"""LIMoE image-text contrastive training on the shared run machinery.

:func:`visionmoe.train.run.run_training` hands over here when ``config.text`` is set. The run
directory layout, the :class:`MetricsLog` and :class:`Checkpoint` hooks, checkpoint format and
deterministic resume are the classification ones; only the step (InfoNCE + routing losses), the
batches (image + one of its captions) and the evaluation (zero-shot accuracy from class prompts)
differ. The batch at step ``s`` is a pure function of ``(seed, s)``, caption choice included, so
a resumed run replays the uninterrupted one exactly.

Data: ``data.kind="digits"`` is the bundled captioned digits
(:func:`~visionmoe.data.captions.load_digit_captions`); ``data.kind="folder"`` with ``data.path``
reads a caption folder (:func:`~visionmoe.data.captions.load_caption_folder`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visionmoe.data import BatchIterator, to_model_input
from visionmoe.data.captions import (
    CaptionedImages,
    CaptionSplits,
    digit_class_prompts,
    load_caption_folder,
    load_digit_captions,
)
from visionmoe.data.text import Tokenizer
from visionmoe.models.limoe import PAD_ID, LIMoE
from visionmoe.models.limoe_aux import contrastive_loss
from visionmoe.runtime import autocast
from visionmoe.train.checkpoint import atomic_write_text, resolve_checkpoint
from visionmoe.train.config import ExperimentConfig
from visionmoe.train.features import prepare_model
from visionmoe.train.hooks import Checkpoint, MetricsLog
from visionmoe.train.loop import Hook, TrainState, augment_for_step, fit
from visionmoe.train.optim import build_optimizer
from visionmoe.train.rundir import restore_or_init

CAPTION_KINDS = ("digits", "folder")


@dataclass
class PairData:
    """Model-ready pairs: ``x (N, C, H, W)``, ``tokens (N, P, L)`` (P = most captions of any
    image, short lists repeat their captions; L <= max_len, the longest text), ``num_captions
    (N,)`` and ``labels (N,)`` where classes are known."""

    x: torch.Tensor
    tokens: torch.Tensor
    num_captions: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.x)


def load_caption_splits(config: ExperimentConfig) -> CaptionSplits:
    """The configured image-text dataset, with ``data.max_train_examples`` applied."""
    data = config.data
    if data.kind == "digits":
        splits = load_digit_captions(config.train.seed, data.test_fraction)
    elif data.kind == "folder":
        if data.path is None:
            raise ValueError("data.kind='folder' needs a caption folder: pass --data PATH")
        splits = load_caption_folder(data.path, test_fraction=data.test_fraction)
    else:
        raise ValueError(
            f"image-text (LIMoE) runs read data.kind in {CAPTION_KINDS}, got {data.kind!r}"
        )
    n = data.max_train_examples
    if n is not None and len(splits.train) > n:
        t = splits.train
        labels = None if t.labels is None else t.labels[:n]
        splits.train = CaptionedImages(t.images[:n], t.captions[:n], labels, t.class_names)
    return splits


def to_pairs(split: CaptionedImages, config: ExperimentConfig, tokenizer: Tokenizer) -> PairData:
    """Resize, scale and tokenise once up front: per-step work is then just indexing."""
    model, max_len = config.model, config.text.max_len
    x = torch.cat(
        [
            to_model_input(split.images[i : i + 4096], model.image_size, model.in_chans)
            for i in range(0, len(split), 4096)
        ]
    )
    most = max(len(c) for c in split.captions)
    texts = [c[j % len(c)] for c in split.captions for j in range(most)]
    tokens = tokenizer.encode_batch(texts, max_len).view(len(split), most, max_len)
    # Columns that are pad in every text cost attention FLOPs and change nothing: drop them.
    used = int((tokens != PAD_ID).flatten(0, 1).any(dim=0).nonzero().max()) + 1
    tokens = tokens[..., :used].contiguous()
    counts = torch.tensor([len(c) for c in split.captions], dtype=torch.long)
    labels = None if split.labels is None else torch.as_tensor(split.labels, dtype=torch.long)
    return PairData(x, tokens, counts, labels)


def pair_batch(
    data: PairData, batches: BatchIterator, step: int, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and one caption each for ``step``; the caption is drawn from ``(seed, step)``."""
    idx_np = batches.indices_for_step(step).astype("int64")
    idx = torch.from_numpy(idx_np)
    pick = np.random.default_rng((config.train.seed, step)).random(len(idx_np))
    which = torch.from_numpy((pick * data.num_captions[idx].numpy()).astype("int64"))
    x, tokens = data.x.index_select(0, idx), data.tokens[idx, which]
    return augment_for_step(x, step, config), tokens


def contrastive_step(
    model: LIMoE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    tokens: torch.Tensor,
    config: ExperimentConfig,
) -> dict[str, torch.Tensor]:
    """One optimisation step: ``InfoNCE + sum over MoE blocks of the routing losses``.

    Metrics come back as 0-dim tensors on the model's device (read on log steps only).
    """
    model.train()
    with autocast(x.device, config.train.precision):
        logits, aux = model(x, tokens, return_aux=True)
    logits = logits.float()
    task = contrastive_loss(logits)
    loss = task + aux.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = config.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
    optimizer.step()
    with torch.no_grad():
        # A text identical to the image's own caption (a common phrasing) counts as a hit.
        chosen = tokens[logits.argmax(dim=1)]
        accuracy = (chosen == tokens).all(dim=1).float().mean()
    metrics = {
        "train/loss": loss.detach(),
        "train/task_loss": task.detach(),
        "train/aux_loss": aux.loss.detach(),
        "train/accuracy": accuracy,
        "train/grad_norm": grad_norm.detach(),
        "train/temperature": 1.0 / model.logit_scale.detach(),
    }
    metrics.update(aux.metric_tensors())
    return metrics


def contrastive_fit(state: TrainState, data: PairData, hooks: Sequence[Hook]) -> TrainState:
    """The fit loop of :mod:`visionmoe.train.loop`, with pair batches and the contrastive step."""
    return fit(state, data, hooks, batch_fn=pair_batch, step_fn=contrastive_step)


@torch.no_grad()
def pair_loss(model: LIMoE, data: PairData, batch_size: int, precision: str = "fp32") -> float:
    """Mean InfoNCE over test pairs (first caption each), in batches of ``batch_size``.

    In-batch negatives: the value depends on ``batch_size`` (bigger batches, harder task).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x, tokens = data.x[i : i + batch_size], data.tokens[i : i + batch_size, 0]
        with autocast(device, precision):
            logits = model(x.to(device), tokens.to(device))
        total += float(contrastive_loss(logits.float())) * len(x)
        count += len(x)
    model.train(was_training)
    return total / max(count, 1)


class ZeroShotEvaluate:
    """Every ``every`` steps and at the end: zero-shot accuracy from class prompts (when the
    test split has labels and prompts exist) and the test pair loss."""

    def __init__(
        self,
        data: PairData,
        name: str,
        prompts: list[list[str]] | None,
        tokenizer: Tokenizer,
        every: int,
        batch_size: int,
        log: MetricsLog,
    ):
        self.data, self.name, self.prompts, self.tokenizer = data, name, prompts, tokenizer
        self.every, self.batch_size, self.log = every, batch_size, log
        self.last: dict = {}

    def run(self, state: TrainState) -> None:
        from visionmoe.eval.zeroshot import zeroshot_accuracy

        precision = state.config.train.precision
        result = {"loss": pair_loss(state.model, self.data, self.batch_size, precision)}
        if self.prompts is not None and self.data.labels is not None:
            scores = zeroshot_accuracy(
                state.model,
                self.data.x,
                self.data.labels,
                self.prompts,
                self.tokenizer,
                self.batch_size,
                precision,
            )
            result["zeroshot_accuracy"] = scores["accuracy"]
        self.last = {f"eval/{self.name}/{k}": v for k, v in result.items()}
        state.metrics.update(self.last)
        self.log.write({"step": state.step, **self.last})
        if self.log.bar is not None:
            text = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
            self.log.bar.write(f"step {state.step}: test {text}")

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0 and state.step < state.config.train.steps:
            self.run(state)

    def at_end(self, state: TrainState) -> None:
        self.run(state)


def load_init_limoe(model: LIMoE, state: dict[str, torch.Tensor]) -> list[str]:
    """Start from a LIMoE run, or from a classification ViT run's backbone (text parts fresh)."""
    notes = []
    if not any(k.startswith("vit.") for k in state):
        state = {f"vit.{k}": v for k, v in state.items()}
        notes.append("image backbone initialised from a ViT run; text embeddings are fresh")
    own = model.state_dict()
    backbone = [k for k in own if k.startswith("vit.blocks.")]
    bad = [k for k in backbone if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise ValueError(
            f"initial weights do not fit the model's blocks (missing or other shape: {bad[:5]})"
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    if fresh:
        notes.append(f"{len(fresh)} tensors kept their fresh init, e.g. {fresh[:3]}")
    return notes


def train_contrastive(
    config: ExperimentConfig,
    run_dir: Path,
    ckpt: dict | None,
    resumed: bool,
    init: str | os.PathLike | None,
    progress: bool,
) -> dict:
    """Train a LIMoE run into ``run_dir`` (``ckpt``: the checkpoint to resume from, if any)."""
    tokenizer = Tokenizer()
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(
            f"text.vocab_size={config.text.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids"
        )
    splits = load_caption_splits(config)
    train_data = to_pairs(splits.train, config, tokenizer)
    test_data = to_pairs(splits.test, config, tokenizer)
    prompts = digit_class_prompts() if config.data.kind == "digits" else None
    if splits.train.class_names is not None:
        atomic_write_text(run_dir / "classes.json", json.dumps(splits.train.class_names))

    if config.train.grad_accum > 1:
        raise ValueError(
            "train.grad_accum > 1 is not supported for image-text runs: the contrastive loss "
            "takes its negatives from the whole batch, so micro-batches would change it"
        )
    model, _ = prepare_model(LIMoE(config.model, config.text), config)
    optimizer = build_optimizer(model, config.optim)
    start_step = ckpt["meta"]["step"] if ckpt is not None else 0
    notes = restore_or_init(model, optimizer, run_dir, ckpt, init, load_init_limoe)

    train = config.train
    log = MetricsLog(run_dir, train.log_every, train.steps, start_step, progress, train.tensorboard)
    evaluator = ZeroShotEvaluate(
        test_data, splits.name, prompts, tokenizer, train.eval_every, train.eval_batch_size, log
    )
    hooks = [log, evaluator, Checkpoint(run_dir, train.checkpoint_every, train.keep_checkpoints)]
    state = TrainState(config, model, optimizer, step=start_step)
    began = time.perf_counter()
    contrastive_fit(state, train_data, hooks)
    final = {k.rsplit("/", 1)[-1]: v for k, v in evaluator.last.items()}
    summary = {
        "name": config.name,
        "run_dir": str(run_dir),
        "dataset": splits.name,
        "task": "image-text contrastive (LIMoE)",
        "steps": state.step,
        "test_accuracy": final.get("zeroshot_accuracy"),
        "zeroshot_accuracy": final.get("zeroshot_accuracy"),
        "test_loss": final.get("loss"),
        "temperature": float(1.0 / model.logit_scale.detach()),
        "train_seconds_this_session": time.perf_counter() - began,
        "resumed_from_step": start_step if resumed else None,
        "init": str(init) if init is not None else None,
        "init_notes": notes,
        "num_params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(resolve_checkpoint(run_dir)),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
