"""docs/data.sha256 (the checksums of docs/data.md) matches ../shared/data when it is present."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REPO, requires_shared

LIST = REPO / "docs" / "data.sha256"


def _entries() -> list[tuple[str, str]]:
    rows = []
    for line in LIST.read_text().splitlines():
        digest, name = line.split("  ", 1)  # sha256sum's text format: "<hex>  <path>"
        rows.append((digest, name))
    return rows


def test_list_format() -> None:
    rows = _entries()
    names = [name for _, name in rows]
    assert len(names) == len(set(names)) and names == sorted(names)
    for digest, name in rows:
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), name
        assert name.startswith("../shared/data/"), name


@requires_shared
def test_shared_data_matches_the_list() -> None:
    rows = _entries()
    listed: dict[Path, set[str]] = defaultdict(set)
    bad = []
    for digest, name in rows:
        path = REPO / name
        listed[path.parent].add(path.name)
        if not path.is_file():
            bad.append(f"missing: {name}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(f"sha256 differs: {name}")
    for folder, names in listed.items():
        on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".md"}
        bad += [f"not in docs/data.sha256: {folder / n}" for n in sorted(on_disk - names)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["span_tiny_ch26.pth", "dsclora_ch26.pth", "span_ch28.pth"])
def test_data_page_gives_each_checkpoint_its_full_sha256(name: str) -> None:
    digest = dict((n, d) for d, n in _entries())[f"../shared/data/weights/{name}"]
    assert f"`{digest}`" in (REPO / "docs" / "data.md").read_text()
