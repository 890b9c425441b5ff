"""A folder's state, for tests that check a command touched nothing it should not have."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(root: Path) -> dict:
    """path -> sha256 (files), 'dir' (folders), 'link:target' (symlinks), 'special' (others)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out
