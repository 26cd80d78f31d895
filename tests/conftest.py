"""Shared test helpers: the repository root on ``sys.path`` and the ``../shared/data`` location.

Tests that need the shared data use the ``shared_data`` fixture (a ``Path``) or the
``requires_shared`` marker; both skip with a clear reason only when ``../shared/data`` is absent
(CI always has it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent (CI provides it)"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (CI provides it)")
    return SHARED
