"""Reference predictors for Table 2: what a score means next to an answer that ignores the model.

``references: [mean_shape, input, nearest]`` in an experiment config adds rows ``ref:NAME``, scored
exactly like every trained method (same targets, same implant derivation as ``skullrec predict``, same
collapse check):

* ``mean_shape``: the voxel-wise mean of the training complete skulls, thresholded at the level that
  maximises the mean DSC against those same training skulls (chosen on training skulls only, never on
  an evaluation set). The same mask for every input: an input-independent answer (it collapses).
* ``input``: the defective skull returned unchanged (skull DSC is high because the defect is a tenth
  of the skull; the implant is empty).
* ``nearest``: the complete skull of the training case whose *defective* skull has the highest Dice
  with the input (a nearest-neighbour lookup on what predict sees).

All volumes are the data set's prepared ``size^3`` grids (each case on its own crop box, as the model
sees them); the predictors therefore compare voxel arrays directly, like the model does.
"""

from __future__ import annotations

import numpy as np

from ..config import REFERENCES


def dice_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice between every mask of ``a`` (N, ...) and every mask of ``b`` (M, ...): (N, M); 1 where both are empty."""
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    inter = fa @ fb.T
    denom = fa.sum(1)[:, None] + fb.sum(1)[None, :]
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def mean_shape(train_complete: np.ndarray) -> tuple[np.ndarray, float]:
    """(mask, threshold): the voxel-wise mean of the training skulls at the DSC-maximising level (training skulls only)."""
    n = len(train_complete)
    mean = train_complete.astype(np.float64).mean(0)
    # The mean of n binary masks takes the values k/n, so every level between two of them gives the same
    # mask; the midpoints cover all distinct masks.
    levels = (np.arange(n) + 0.5) / n
    best_t, best = levels[0], -1.0
    for t in levels:
        score = float(dice_matrix((mean > t)[None], train_complete).mean())
        if score > best:
            best_t, best = float(t), score
    return (mean > best_t).astype(np.uint8), best_t


def reference_predictions(name: str, train_complete: np.ndarray, train_defective: np.ndarray, defective: np.ndarray,
                          mean_mask: np.ndarray | None = None) -> np.ndarray:
    """Predicted complete skulls (N, ...) uint8 of reference ``name`` for the defective skulls ``defective``.

    ``mean_mask``: ``mean_shape(train_complete)[0]`` when the caller already has it (it does not depend on the inputs).
    """
    if name == "mean_shape":
        mask = mean_shape(train_complete)[0] if mean_mask is None else mean_mask
        return np.repeat(mask[None], len(defective), axis=0)
    if name == "input":
        return defective.astype(np.uint8).copy()
    if name == "nearest":
        nearest = dice_matrix(defective, train_defective).argmax(1)
        return train_complete[nearest].astype(np.uint8)
    raise ValueError(f"unknown reference {name!r} (known: {', '.join(REFERENCES)})")


__all__ = ["REFERENCES", "dice_matrix", "mean_shape", "reference_predictions"]
