"""Stage-2 geometry: the box, crop and paste (exact, any spacing and axis order), the network grid
round trip, localisation and the restriction of the implant (no overlap, one piece)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from skullrec.inference.stage2 import (
    box_around, crop, defect_centre, from_grid, largest_piece, paste, restrict_implant, restrict_in_box, stage2_implant, stage2_input, to_grid,
)
from skullrec.io import Volume
from skullrec.data.resample import Box
from skullrec.nets.implant_net import ImplantNetConfig, build_implant_net


def _blob(rng, shape, sigma=2.0):
    return ndi.gaussian_filter((rng.random(shape) < 0.5).astype(float), sigma) > 0.5


def _affine(spacing, origin=(10.0, -20.0, 5.0)):
    a = np.eye(4)
    a[:3, :3] = np.diag(spacing)
    a[:3, 3] = origin
    return a


@pytest.mark.parametrize("seed", range(4))
def test_pasted_crop_lands_exactly_where_it_was_cut(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(30, 50, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.5, 3))
    mask = _blob(rng, shape)
    # near a corner (seed 0: the box hangs over the volume) or inside
    centre = np.array([2.0, 3.0, shape[2] - 2.0]) if seed == 0 else rng.uniform(5, np.array(shape) - 5)
    box = box_around(centre, spacing, box_mm=20.0)
    n = np.array(box.shape)
    assert np.all(np.abs(n * np.array(spacing) - 20.0) <= np.array(spacing) / 2 + 1e-9)  # 20 mm per axis
    assert np.all(np.abs((np.array(box.lo) + np.array(box.hi) - 1) / 2 - centre) <= 0.5 + 1e-9)  # centred
    part = crop(mask.astype(np.uint8), box)
    assert part.shape == box.shape
    pasted = paste(part, box, shape)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(max(lo, 0), min(hi, s)) for lo, hi, s in zip(box.lo, box.hi, shape))] = True
    np.testing.assert_array_equal(pasted.astype(bool), mask & inside)
    if seed == 0:
        assert inside.sum() < np.prod(box.shape)  # really overhanging: outside read as 0, not pasted


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_box_follows_any_axis_order_in_physical_space(perm):
    """The same skull stored with permuted axes: the box and the pasted crop cover the same mm points."""
    rng = np.random.default_rng(7)
    shape, spacing = (40, 34, 28), (0.5, 0.9, 1.6)
    mask = _blob(rng, shape)
    aff = _affine(spacing)
    centre = np.array([21.3, 15.8, 12.2])
    box = box_around(centre, spacing, 18.0)
    ref = paste(crop(mask.astype(np.uint8), box), box, shape).astype(bool)
    ref_world = {tuple(np.round(aff[:3, :3] @ i + aff[:3, 3], 6)) for i in np.argwhere(ref)}
    # permuted copy: array axis k of the copy is axis perm[k] of the original
    m2 = np.transpose(mask, perm)
    aff2 = np.eye(4)
    aff2[:3, :3] = aff[:3, :3][:, list(perm)]
    aff2[:3, 3] = aff[:3, 3]
    sp2 = tuple(spacing[p] for p in perm)
    box2 = box_around(centre[list(perm)], sp2, 18.0)
    assert box2.lo == tuple(box.lo[p] for p in perm) and box2.hi == tuple(box.hi[p] for p in perm)
    got = paste(crop(m2.astype(np.uint8), box2), box2, m2.shape).astype(bool)
    got_world = {tuple(np.round(aff2[:3, :3] @ i + aff2[:3, 3], 6)) for i in np.argwhere(got)}
    assert got_world == ref_world and len(ref_world) > 100


def test_network_grid_round_trip_keeps_shape_and_place():
    rng = np.random.default_rng(3)
    part = _blob(rng, (57, 43, 38), sigma=3.0)
    g = to_grid(part.astype(np.uint8), 32)
    assert g.shape == (32, 32, 32) and 0 <= g.min() and g.max() <= 1
    # area averaging: the grid holds the crop's bone fraction
    assert abs(g.mean() - part.mean()) < 0.01
    back = from_grid(g, part.shape) > 0.5
    dsc = 2 * (back & part).sum() / (back.sum() + part.sum())
    assert dsc > 0.93
    c1, c2 = np.argwhere(part).mean(0), np.argwhere(back).mean(0)
    assert np.all(np.abs(c1 - c2) < 0.5)  # no half-voxel shift between the two grids


def test_defect_centre_and_restriction():
    shape = (30, 30, 30)
    stage1 = np.zeros(shape, bool)
    stage1[5:9, 5:9, 5:9] = True  # a crumb
    stage1[12:24, 10:20, 14:18] = True  # the defect stage 1 found
    np.testing.assert_allclose(defect_centre(stage1), [17.5, 14.5, 15.5])
    assert defect_centre(np.zeros(shape, bool)) is None
    defective = np.zeros(shape, bool)
    defective[:, :, 10:13] = True
    mask = np.zeros(shape, bool)
    mask[14:22, 11:19, 8:18] = True  # overlaps the defective skull: that part must go
    mask[0:10, 22:30, 20:30] = True  # a larger piece away from stage 1's defect: dropped
    out = restrict_implant(mask, defective, stage1)
    assert not (out & defective).any()
    assert ndi.label(out, structure=np.ones((3, 3, 3)))[1] == 1
    assert out[16, 15, 15] and not out[5, 25, 25]
    # the part below the skull plate (z 8-9) is another piece, not touching stage 1: dropped too
    np.testing.assert_array_equal(out, mask & ~defective & (np.indices(shape)[0] >= 14) & (np.indices(shape)[2] >= 13))
    # nothing touching stage 1: the largest piece
    far = restrict_implant(mask, defective, np.zeros(shape, bool))
    np.testing.assert_array_equal(far, largest_piece(mask & ~defective))


@pytest.mark.parametrize("order", ["C", "F"])
def test_restrict_in_box_equals_restricting_the_pasted_mask_on_the_whole_volume(order):
    """predict's box-local restriction gives exactly what the whole-volume computation gave, also for
    boxes reaching past the volume (the outside is not pasted, so it must not join pieces), ties of the
    largest piece, no piece touching stage 1, and empty masks; in the files' Fortran order too."""
    rng = np.random.default_rng(5)
    shape = (30, 26, 22)
    boxes = [Box(lo=(4, 3, 2), hi=(20, 19, 15)), Box(lo=(-6, 15, -3), hi=(12, 33, 10)), Box(lo=(22, -5, 12), hi=(40, 9, 30))]
    seen_outside = 0
    for trial in range(24):
        box = boxes[trial % 3]
        defective = np.asfortranarray(rng.random(shape) < 0.25) if order == "F" else rng.random(shape) < 0.25
        stage1 = np.zeros(shape, bool)
        if trial % 4:  # every fourth trial: stage 1 touches nothing, the largest piece is kept
            stage1[tuple(slice(int(a), int(a) + 4) for a in rng.integers(0, 18, 3))] = True
        mask_box = rng.random(box.shape) < (0.0 if trial == 5 else 0.35)
        want = restrict_implant(paste(mask_box, box, shape), defective, stage1)
        got, raw = restrict_in_box(mask_box, box, defective, stage1)
        np.testing.assert_array_equal(got, want)
        assert raw == int(paste(mask_box, box, shape).sum())
        seen_outside += int(mask_box.sum() > paste(mask_box, box, shape).sum())
    assert seen_outside >= 8  # the boxes past the volume really had mask voxels outside it
    # two equal largest pieces, none touching stage 1: the first (in label order) wins, as before
    mask_box = np.zeros((10, 10, 10), bool)
    mask_box[1:3, 1:3, 1:3] = mask_box[6:8, 6:8, 6:8] = True
    box, none = Box(lo=(5, 5, 5), hi=(15, 15, 15)), np.zeros(shape, bool)
    np.testing.assert_array_equal(restrict_in_box(mask_box, box, none, none)[0],
                                  restrict_implant(paste(mask_box, box, shape), none, none))
    assert restrict_in_box(mask_box, Box(lo=(40, 0, 0), hi=(50, 10, 10)), none, none)[1] == 0  # box wholly outside


def test_stage2_implant_on_a_volume_is_one_piece_outside_the_skull():
    rng = np.random.default_rng(0)
    shape, spacing = (40, 36, 30), (1.2, 1.0, 1.5)
    g = np.indices(shape).astype(float)
    r = np.sqrt((((g.T - np.array(shape) / 2) * spacing) ** 2).sum(-1)).T
    complete = (r < 18) & (r > 14)
    defective = complete & ~(g[2] > 22)
    vol = Volume(defective.astype(np.uint8), _affine(spacing))
    torch.manual_seed(0)
    net = build_implant_net(ImplantNetConfig(grid=16, box_mm=30.0, channels=[2, 4, 8], strides=[2, 2]), seed=1)
    # a bias that makes the untrained net say "implant" everywhere: the restriction must shape it
    with torch.no_grad():
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) or isinstance(m, torch.nn.ConvTranspose3d)][-1]
        last.bias.fill_(50.0)
    implant, info = stage2_implant(net, vol, complete, complete & ~defective, 30.0, 16)
    assert implant.any() and not (implant & defective).any()
    assert ndi.label(implant, structure=np.ones((3, 3, 3)))[1] == 1
    lo, hi = np.array(info["box"]["lo"]), np.array(info["box"]["hi"])
    idx = np.argwhere(implant)
    assert np.all(idx >= np.maximum(lo, 0)) and np.all(idx < hi)  # only inside the box
    assert info["stage2_voxels"] == int(implant.sum())


class _Pointwise(torch.nn.Module):
    """Implant wherever the prior has bone and the defective skull has none: commutes with any flip."""

    def forward(self, x):
        return 10.0 * (x[:, 1:2] - x[:, 0:1]) - 5.0


class _LeftHalf(torch.nn.Module):
    """Ignores its input: certain (logit 20) on the lower half of the grid's axis 0, undecided (0) elsewhere."""

    def forward(self, x):
        out = torch.zeros_like(x[:, :1])
        out[:, :, : x.shape[2] // 2] = 20.0
        return out


def test_stage2_mirror_averages_the_box_and_its_flipped_back_mirror_image():
    """--mirror: the network also sees the box mirrored along axis 0 and its output is mirrored back."""
    shape, spacing = (40, 36, 30), (1.2, 1.0, 1.5)
    g = np.indices(shape).astype(float)
    r = np.sqrt((((g.T - np.array(shape) / 2) * spacing) ** 2).sum(-1)).T
    complete = (r < 18) & (r > 14)
    defective = complete & ~((g[2] > 22) & (g[0] > 21))  # a defect on one side only: the box is not symmetric
    vol, stage1 = Volume(defective.astype(np.uint8), _affine(spacing)), complete & ~defective
    # a net that commutes with the flip gives the same implant either way; mirroring the input without
    # mirroring the output back (or the reverse) would shift this one-sided defect and change it
    plain, _ = stage2_implant(_Pointwise(), vol, complete, stage1, 30.0, 16)
    mirrored, _ = stage2_implant(_Pointwise(), vol, complete, stage1, 30.0, 16, mirror=True)
    assert plain.sum() > 100
    np.testing.assert_array_equal(mirrored, plain)
    # a net that only knows "lower half of axis 0": alone it fills that half; averaged with its mirror
    # image (0.5 * (1 + 0.5) = 0.75 on both halves) it fills both, and without the flip back only one
    half, info = stage2_implant(_LeftHalf(), vol, complete, stage1, 30.0, 16)
    both, _ = stage2_implant(_LeftHalf(), vol, complete, stage1, 30.0, 16, mirror=True)
    mid = (info["box"]["lo"][0] + info["box"]["hi"][0]) / 2.0
    assert np.argwhere(half)[:, 0].max() < mid and half.sum() > 100
    ax0 = np.argwhere(both)[:, 0]
    assert ax0.min() < mid - 3 and ax0.max() > mid + 3 and not (both & defective).any()


def test_stage2_bf16_inference_agrees_with_fp32():
    """bf16 autocast (train.amp: bf16, or stage2_implant(amp="bf16")) against fp32 on a net that has learnt a cap.

    Tolerance stated here: probabilities within 0.03 of each other everywhere on the grid, and the
    two implants on the input grid with Dice >= 0.99 (bf16 keeps 8 mantissa bits, ~0.4 % per
    operation; measured on this case: max difference 0.006, Dice 0.999).
    """
    from skullrec.nets.autoencoder import loss_function

    shape, spacing = (40, 36, 30), (1.2, 1.0, 1.5)
    g = np.indices(shape).astype(float)
    r = np.sqrt((((g.T - np.array(shape) / 2) * spacing) ** 2).sum(-1)).T
    complete = (r < 18) & (r > 14)
    defective = complete & ~(g[2] > 22)
    implant_true = complete & ~defective
    vol = Volume(defective.astype(np.uint8), _affine(spacing))
    net = build_implant_net(ImplantNetConfig(grid=16, box_mm=30.0, channels=[4, 8, 8], strides=[2, 2]), seed=1)
    inp = stage2_input(defective, complete, implant_true, spacing, 30.0, 16)
    x = torch.from_numpy(inp.x)[None]
    y = torch.from_numpy(to_grid(crop(implant_true.astype(np.uint8), inp.box), 16) > 0.5).float()[None, None]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    dice = loss_function("sigmoid_dice")
    for _ in range(100):  # fit this one cap (train_implant's Dice + BCE) so the logits are far from 0 where it matters
        logits = net(x)
        loss = dice(logits, y) + torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.inference_mode():
        p32 = torch.sigmoid(net(x)).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = torch.sigmoid(net(x).float()).numpy()
    assert (p32 > 0.5).sum() > 0.9 * y.sum()  # it did learn the cap
    assert np.abs(p32 - p16).max() < 0.03
    a, _ = stage2_implant(net, vol, complete, implant_true, 30.0, 16)
    b, _ = stage2_implant(net, vol, complete, implant_true, 30.0, 16, amp="bf16")
    assert a.sum() > 0.3 * implant_true.sum()
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99


def test_deep_defect_centre_finds_the_hole_not_the_false_sheet():
    from skullrec.inference.stage2 import deep_defect_centre

    shape, spacing = (48, 48, 48), (2.0, 2.0, 2.0)
    g = np.indices(shape).astype(float)
    r = np.sqrt((((g.T - 23.5) * spacing) ** 2).sum(-1)).T
    complete = (r < 40) & (r > 32)
    defective = complete & ~((g[2] > 38) & (np.abs(g[0] - 23.5) < 9) & (np.abs(g[1] - 23.5) < 9))  # a hole on top
    sheet = (r >= 40) & (r < 43) & (g[0] < 30)  # a thin false sheet over much of the outer surface, larger than the cap
    prediction = complete | sheet
    assert (sheet.sum()) > (complete & ~defective).sum()
    aff = _affine(spacing)
    centre = deep_defect_centre(Volume(defective.astype(np.uint8), aff), Volume(prediction.astype(np.uint8), aff), aff)
    bb = np.argwhere(complete & ~defective)
    true_centre = (bb.min(0) + bb.max(0)) / 2.0
    assert np.abs((centre - true_centre) * spacing).max() < 6.0  # mm
    # the largest piece of everything stage 1 added is the sheet+cap, centred far from the hole
    old = defect_centre(prediction & ~defective)
    assert np.abs((old - true_centre) * spacing).max() > 10.0
    # same physical point when the target grid differs (a 2x finer grid with the same origin)
    fine = _affine((1.0, 1.0, 1.0))
    fine[:3, 3] -= 0.5
    c2 = deep_defect_centre(Volume(defective.astype(np.uint8), aff), Volume(prediction.astype(np.uint8), aff), fine)
    np.testing.assert_allclose(c2, centre * 2 + 0.5, atol=1e-9)
