"""Shared test settings: where the repository and the optional real data (../shared) are.

Tests import these constants (``from conftest import REPO``); pytest puts this folder on sys.path
because tests/ is not a package. Tests on the real data skip themselves when it is absent.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# SkullFix training set (complete_skull/, defective_skull/, implant/ as NRRD), see ../shared/data/real-skulls/SOURCE.md
SKULLFIX_TRAINING = REPO.parent / "shared" / "data" / "real-skulls" / "skullfix-autoimplant2020" / "raw" / "training_set"
