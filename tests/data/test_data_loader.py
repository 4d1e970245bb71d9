"""Rank-sharded, resumable batch reading in DataLoader workers; skipping unreadable images.

The reference for "which samples form the global batch at step s" is the documented formula
``default_rng((seed, epoch)).permutation(N)[position * B : (position + 1) * B]``, written out
here independently of the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmoe.data import (
    DatasetError,
    EvalBatches,
    ImageDataset,
    ImageFiles,
    StepBatches,
    augment,
    eval_indices,
    make_loader,
)

N, B, SEED = 37, 8, 4


def indexed_dataset(n: int = N) -> ImageDataset:
    """Image i is a 1x2x1 image holding i as two bytes, so a batch names its own indices."""
    images = np.zeros((n, 1, 2, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) // 256
    images[:, 0, 1, 0] = np.arange(n) % 256
    return ImageDataset(images, np.arange(n) % 3, ["a", "b", "c"])


def ids(batch: dict) -> list[int]:
    x = batch["images"].numpy().astype(np.int64)
    return (x[:, 0, 0, 0] * 256 + x[:, 0, 1, 0]).tolist()


def reference_global_batch(step: int) -> list[int]:
    steps_per_epoch = N // B
    epoch, position = divmod(step, steps_per_epoch)
    return np.random.default_rng((SEED, epoch)).permutation(N)[position * B : (position + 1) * B]


def read(world_size: int, steps: range, workers: int = 0, transform=None) -> list[list[dict]]:
    """Per step, the batches of every rank (rank order)."""
    per_rank = [
        list(
            make_loader(
                StepBatches(
                    indexed_dataset(),
                    B,
                    SEED,
                    rank=r,
                    world_size=world_size,
                    transform=transform,
                ),
                steps,
                num_workers=workers,
            )
        )
        for r in range(world_size)
    ]
    return [list(batches) for batches in zip(*per_rank, strict=True)]


def test_two_ranks_read_disjoint_halves_of_each_global_batch():
    for step, (rank0, rank1) in zip(range(3, 9), read(2, range(3, 9)), strict=True):
        expected = [int(i) for i in reference_global_batch(step)]
        assert ids(rank0) == expected[: B // 2] and ids(rank1) == expected[B // 2 :]
        assert not set(ids(rank0)) & set(ids(rank1))
        assert rank0["step"] == rank1["step"] == step
        # Labels travel with their images.
        assert rank0["labels"].tolist() == [i % 3 for i in expected[: B // 2]]


def test_resume_on_another_world_size_sees_the_same_global_batches():
    uninterrupted = read(1, range(0, 12))
    resumed = read(4, range(7, 12), workers=2)  # crosses the epoch boundary at step 9
    for step, ranks in zip(range(7, 12), resumed, strict=True):
        global_ids = [i for batch in ranks for i in ids(batch)]
        assert global_ids == ids(uninterrupted[step][0])
        assert global_ids == [int(i) for i in reference_global_batch(step)]


def noisy(image: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """A per-sample transform whose output shows the random stream it was given."""
    noise = torch.randint(0, 256, (1, 2, 1), generator=generator, dtype=torch.uint8).numpy()
    return np.concatenate([image, noise], axis=2)


def test_per_sample_randomness_depends_on_seed_step_and_position_only():
    step = 5
    one_rank = read(1, range(step, step + 1), transform=noisy)[0][0]
    two_ranks = read(2, range(step, step + 1), transform=noisy, workers=1)[0]
    noise = torch.cat([b["images"][..., 1] for b in two_ranks])
    torch.testing.assert_close(noise, one_rank["images"][..., 1], rtol=0, atol=0)
    for position in (0, 5):
        # The documented seed: SeedSequence((seed, step, position)) -> one uint64.
        seed64 = int(np.random.SeedSequence((SEED, step, position)).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed64)
        drawn = torch.randint(0, 256, (1, 2, 1), generator=generator, dtype=torch.uint8)[..., 0]
        np.testing.assert_array_equal(one_rank["images"][position, ..., 1].numpy(), drawn)
    again = read(1, range(step, step + 1), transform=noisy)[0][0]
    torch.testing.assert_close(again["images"], one_rank["images"], rtol=0, atol=0)


def test_ranks_must_split_the_batch_evenly():
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(indexed_dataset(), B, SEED, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        StepBatches(indexed_dataset(), B, SEED, rank=2, world_size=2)


def test_eval_order_is_a_seeded_permutation_split_over_ranks():
    order = np.random.default_rng((SEED, 2**31)).permutation(N)
    for world in (1, 2, 3):
        blocks = [eval_indices(N, SEED, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(blocks), order)
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert not np.array_equal(order, np.sort(order))  # not class / file order
    batches = list(make_loader(EvalBatches(indexed_dataset(), 10, SEED), range(4)))
    assert [len(b["labels"]) for b in batches] == [10, 10, 10, 7]
    assert [i for b in batches for i in ids(b)] == order.tolist()


def test_augment_of_a_share_matches_the_whole_batch():
    x = torch.arange(6 * 2 * 4 * 4, dtype=torch.float32).reshape(6, 2, 4, 4)
    whole = augment(x, torch.Generator().manual_seed(3), 1, True)
    positions = torch.tensor([3, 4, 5])
    part = augment(
        x[3:], torch.Generator().manual_seed(3), 1, True, positions=positions, draw_size=6
    )
    torch.testing.assert_close(part, whole[3:], rtol=0, atol=0)


def write_files(root: Path) -> ImageFiles:
    names = []
    for i in range(4):
        Image.fromarray(np.full((3, 3), 10 * i, dtype=np.uint8)).save(root / f"{i}.png")
        names.append(f"{i}.png")
    (root / "2.png").write_bytes((root / "2.png").read_bytes()[:30])  # truncated
    return ImageFiles(names, np.zeros(4, dtype=np.int64), ["only"], root=root)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_skipped_and_named(tmp_path: Path, workers: int):
    files = write_files(tmp_path)
    batches = list(
        make_loader(EvalBatches(files, 4, SEED), range(1), num_workers=workers, timeout_s=60)
    )
    (batch,) = batches
    assert sorted(batch["images"][:, 0, 0, 0].tolist()) == [0, 10, 30]
    assert len(batch["skipped"]) == 1 and "2.png" in batch["skipped"][0]
    # Positions identify the kept samples (dataset indices for evaluation).
    assert sorted(batch["positions"].tolist()) == [0, 1, 3]


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_loading_stops_with_one_line_naming_the_file(tmp_path: Path, workers: int):
    files = write_files(tmp_path)
    loader = make_loader(
        EvalBatches(files, 4, SEED, strict=True), range(1), num_workers=workers, timeout_s=60
    )
    with pytest.raises(DatasetError, match="2.png") as excinfo:
        list(loader)
    assert "\n" not in str(excinfo.value) and "strict" in str(excinfo.value)


def test_ops_transform_gets_the_encoded_file_and_corrupt_files_are_skipped(tmp_path: Path):
    from visionmoe.data.ops import InceptionCrop, Transform

    files = write_files(tmp_path)
    crop = Transform(ops=(InceptionCrop(size=2),))
    (batch,) = make_loader(EvalBatches(files, 4, SEED, transform=crop), range(1))
    assert tuple(batch["images"].shape) == (3, 2, 2, 3)
    # Flat images: any crop of image i holds only its value 10 * i.
    assert sorted(batch["images"][:, 0, 0, 0].tolist()) == [0, 10, 30]
    assert len(batch["skipped"]) == 1 and "2.png" in batch["skipped"][0]


class Stuck:
    """A source whose reads stall (a hung network mount, say) past the loader timeout."""

    labels = np.zeros(4, dtype=np.int64)
    class_names = ["only"]

    def __len__(self) -> int:
        return 4

    def read(self, index: int) -> np.ndarray:
        import time

        time.sleep(3)  # longer than the timeout; short so the worker exits soon after
        return np.zeros((1, 1, 1), dtype=np.uint8)


def test_a_stuck_worker_is_an_error_not_a_hang():
    loader = make_loader(EvalBatches(Stuck(), 4, SEED), range(1), num_workers=1, timeout_s=1)
    with pytest.raises(RuntimeError, match="timed out after 1 seconds"):
        next(iter(loader))


def test_subset_forwards_only_what_its_base_has(tmp_path: Path):
    from visionmoe.data import Subset

    files = Subset(write_files(tmp_path), np.array([3, 1]))
    assert files.encoded(0) == str(tmp_path / "3.png") and files.describe(1).endswith("1.png")
    arrays = Subset(indexed_dataset(), np.array([5]))
    assert not hasattr(arrays, "encoded") and ids(
        {"images": torch.from_numpy(arrays.read(0))[None]}
    ) == [5]
