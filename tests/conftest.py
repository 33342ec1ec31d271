"""Shared test settings: where the repository and the optional real data (../shared) are.

Tests import these constants (``from conftest import REPO``); pytest puts this folder on sys.path
because tests/ is not a package. Tests on the real data skip themselves when it is absent.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# SkullFix training set (complete_skull/, defective_skull/, implant/ as NRRD), see ../shared/data/real-skulls/SOURCE.md
SKULLFIX_TRAINING = REPO.parent / "shared" / "data" / "real-skulls" / "skullfix-autoimplant2020" / "raw" / "training_set"


def seed_of_this_test() -> int:
    """The running test's seed, from its name and SKULLREC_TEST_SEED (default 0), so CI runs are reproducible.

    Statistical checks (a few standard errors) therefore cannot flake in CI; ``SKULLREC_TEST_SEED=random``
    draws a fresh seed per test from os.urandom to explore other inputs, and failure messages print the seed.
    """
    base = os.environ.get("SKULLREC_TEST_SEED", "0")
    if base == "random":
        return int.from_bytes(os.urandom(4), "little") % 2**31
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return (int(base) + zlib.crc32(name.encode())) % 2**31
