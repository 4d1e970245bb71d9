"""What a weight conversion did: which source tensors went where, and what did not fit.

Converters never drop or invent weights silently: every source tensor either feeds a parameter of
our model or is listed as unmapped, and every model parameter either came from the source or is
listed as missing, so a user can tell a faithful port from a partial one at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visionmoe.layers.patch_embed import resize_pos_embed
from visionmoe.models.vit import VisionTransformer

HEAD_KEYS = ("head.weight", "head.bias")
NEW_HEAD_NOTE = "new zero-initialised head"


@dataclass
class ConversionReport:
    """The outcome of mapping a foreign parameter tree onto our state dict.

    Attributes:
      source: where the weights came from (a path or a format name).
      mapped: our parameter name -> the source names it was built from (fused q/k/v: several).
      unmapped: source names nothing was built from (unknown or unsupported parts).
      missing: our parameter names the source did not provide (left at their initial values).
      notes: adaptations made on the way (resized position embedding, new head, ...).
    """

    source: str
    mapped: dict[str, list[str]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every source tensor was used and every parameter was provided."""
        return not self.unmapped and not self.missing

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "mapped": {k: list(v) for k, v in self.mapped.items()},
            "unmapped": list(self.unmapped),
            "missing": list(self.missing),
            "notes": list(self.notes),
        }

    def summary(self, limit: int = 8) -> str:
        """A few human-readable lines (lists cut to ``limit`` names)."""

        def cut(names: list[str]) -> str:
            more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
            return ", ".join(names[:limit]) + more

        lines = [f"{self.source}: {len(self.mapped)} parameters converted"]
        if self.unmapped:
            lines.append(f"  unmapped source tensors ({len(self.unmapped)}): {cut(self.unmapped)}")
        if self.missing:
            lines.append(f"  missing parameters ({len(self.missing)}): {cut(self.missing)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _adapt(model: VisionTransformer, state: dict[str, torch.Tensor], report: ConversionReport):
    """Resize the position embedding / drop the head where the model was asked to differ."""
    own = model.state_dict()
    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resize_pos_embed(pos, model.num_prefix, grid)
        report.notes.append(f"position embedding resized to a {grid}x{grid} grid")
    head, own_head = state.get("head.weight"), own.get("head.weight")
    if head is not None and own_head is not None and head.shape != own_head.shape:
        report.notes.append(
            f"{NEW_HEAD_NOTE}: the weights have {head.shape[0]} classes, the model "
            f"{model.config.num_classes}"
        )
        for key in HEAD_KEYS:
            state.pop(key, None)
            report.mapped.pop(key, None)


def apply_state(
    model: VisionTransformer,
    state: dict[str, torch.Tensor],
    report: ConversionReport,
    strict: bool = True,
) -> None:
    """Load converted ``state`` into ``model`` and complete ``report``.

    A different class count (new zero head) or image size (bilinear position-embedding resize)
    is adapted and noted. Shape mismatches always raise; missing parameters raise when
    ``strict``, else stay at their initial values and are listed in ``report.missing``.
    Parameters the model has no place for move to ``report.unmapped``.
    """
    _adapt(model, state, report)
    own = model.state_dict()
    new_head = any(n.startswith(NEW_HEAD_NOTE) for n in report.notes)
    report.missing = sorted(set(own) - set(state) - (set(HEAD_KEYS) if new_head else set()))
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    for key in sorted(set(state) - set(own)):  # e.g. a head when the model has none
        report.unmapped.extend(report.mapped.pop(key, [key]))
    report.unmapped.sort()
    if mismatched or (strict and report.missing):
        problems = [f"shape mismatch: {', '.join(mismatched[:5])}"] if mismatched else []
        problems += [f"{len(report.missing)} parameters missing"] if report.missing else []
        raise ValueError(
            f"converted weights do not fit the model ({'; '.join(problems)}); check the "
            f"format/preset/overrides for these weights\n{report.summary()}"
        )
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
