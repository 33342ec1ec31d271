"""The fast full-resolution path of case_metrics (box crop, shared-surface skip, pruned bDSC search,
counted Dice) gives the values of the full-volume computation it replaced, on small cases that
exercise each shortcut: shapes far from and touching the border, surfaces shared by prediction and
truth (a defective skull inside its complete skull), anisotropic spacing, both targets, both HD95s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy import ndimage as ndi

from skullrec.evaluation.metrics import BORDER_MM, case_metrics, dice, evaluation_box

FLOAT_KEYS = ("hd_mm", "hd95_mm", "hd_vox", "hd95_vox")


def _blob(rng: np.random.Generator, shape, sigma: float = 1.5) -> np.ndarray:
    return ndi.gaussian_filter((rng.random(shape) < 0.5).astype(float), sigma) > 0.5


def _case(seed: int):
    """(pred, truth, defective, spacing, target): a skull-like pair somewhere in a larger volume.

    truth = a shell ("complete skull"); defective = truth minus a cut-out cap; pred is the defective
    skull plus a blobby, shifted guess at the cap (so most surface voxels are shared with truth).
    Even seeds place the shell against the volume border, odd seeds well inside it.
    """
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.2, 3))
    shape = (44, 38, 32)
    g = np.indices(shape).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    if seed % 2 == 0:
        centre[seed % 3] = 9.0  # the shell is cut by the volume's face: the border counts as background
    r = np.sqrt((((g - centre[:, None, None, None]) * np.asarray(spacing)[:, None, None, None] / np.asarray(spacing).mean()) ** 2).sum(0))
    truth = (r < 11) & (r > 8)
    cap = g[2] > centre[2] + rng.uniform(3, 6)
    defective = truth & ~cap
    guess = np.roll(truth & cap, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2)) & _blob(rng, shape, 1.0)
    pred_skull = defective | guess
    if seed % 4 == 1:  # implant target: implants only (the predicted one may overlap the defective skull)
        return guess | (ndi.binary_dilation(truth & cap) & _blob(rng, shape)), truth & cap, defective, spacing, "implant"
    return pred_skull, truth, defective, spacing, "skull"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("hd95", ["max", "pooled"])
def test_fast_equals_full_volume(seed, hd95):
    pred, truth, defective, spacing, target = _case(seed)
    assert pred.any() and truth.any()
    fast = case_metrics(pred, truth, spacing, defective=defective, hd95=hd95, target=target)
    full = case_metrics(pred, truth, spacing, defective=defective, hd95=hd95, target=target, full_volume=True)
    assert fast["dsc"] == full["dsc"]
    assert fast["bdsc"] == full["bdsc"]
    assert 0.0 < fast["bdsc"] < 1.0  # the border region really decides something here
    for k in FLOAT_KEYS:
        assert fast[k] == pytest.approx(full[k], rel=1e-6, abs=1e-6), k
    assert fast["hd_mm"] > 0
    # and without a defective skull (the box then only grows by one voxel)
    fast = case_metrics(pred, truth, spacing, hd95=hd95, target=target)
    full = case_metrics(pred, truth, spacing, hd95=hd95, target=target, full_volume=True)
    assert fast["dsc"] == full["dsc"] and fast["bdsc"] is full["bdsc"] is None
    for k in FLOAT_KEYS:
        assert fast[k] == pytest.approx(full[k], rel=1e-6, abs=1e-6), k


def test_box_is_smaller_than_the_volume_and_holds_what_it_must():
    """The crop really happens (else the test above proves nothing) and covers masks + border band."""
    pred, truth, defective, spacing, _ = _case(1)
    box = evaluation_box(pred, truth, spacing, with_border=False)
    inside = np.zeros(pred.shape, bool)
    inside[box] = True
    assert inside.sum() < 0.5 * inside.size
    assert not ((pred | truth) & ~inside).any()
    for ax, sl in enumerate(box):  # tight: every face of the box holds a mask voxel
        assert np.take(pred | truth, sl.start, axis=ax).any() and np.take(pred | truth, sl.stop - 1, axis=ax).any()
    grown = evaluation_box(pred, truth, spacing, with_border=True)
    for sl, gl, sp in zip(box, grown, spacing):
        assert gl.start == max(sl.start - (int(np.ceil(BORDER_MM / sp)) + 1), 0)


def test_bdsc_sees_defective_bone_outside_the_masks_box():
    """An implant 4 mm above a skull plate: only the plate, outside the implants' box, puts it in the band."""
    shape, spacing = (20, 20, 30), (1.0, 1.0, 1.0)
    defective = np.zeros(shape, bool)
    defective[:, :, 0:3] = True
    truth = np.zeros(shape, bool)
    truth[5:15, 5:15, 6:9] = True
    pred = np.zeros(shape, bool)
    pred[6:16, 5:15, 6:10] = True
    fast = case_metrics(pred, truth, spacing, defective=defective, target="implant")
    full = case_metrics(pred, truth, spacing, defective=defective, target="implant", full_volume=True)
    inter, total = (pred & truth).sum(), pred.sum() + truth.sum()
    assert fast["bdsc"] == full["bdsc"] == pytest.approx(2 * inter / total)  # all within 10 mm
    assert fast["dsc"] == full["dsc"]


@pytest.mark.parametrize("seed", range(6))
def test_dice_by_counting_is_compute_dice_bit_for_bit(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = _blob(rng, (30, 26, 22)), _blob(rng, (30, 26, 22))
    ref = compute_dice(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(),
                       include_background=True, ignore_empty=False).item()
    assert dice(a, b) == ref
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
