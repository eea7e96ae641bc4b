"""The source files a backbone's cached features depend on, and their digest.

Stage one's fingerprint carries this digest, so a cache made by other feature code is
refused by name (``--force`` rebuilds) instead of feeding stage two stale features. The
files are the ones ``dvc.yaml`` lists for each ``extract@<backbone>`` stage (a test keeps
the two equal), so DVC and ``pipeline extract`` agree on what counts as a change: any byte
of the backbone's own module or of the shared code below, comments included.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from stages.extract.backbones import Backbone

ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/ and stages/
SHARED = (
    "stages/extract/backbones/__init__.py",  # base classes, weight loading
    "stages/extract/contract.py",  # lead selection, resampling, normalisation
    "stages/extract/run.py",  # batching, autocast, what is written
    "stages/prepare/rpeaks.py",  # R-peaks of the beat experts
    "pipeline/feature_cache.py",  # array specs and the store layout
    "pipeline/leads.py",  # lead order
)


def feature_code(backbone: Backbone) -> list[Path]:
    """The backbone's module, then the shared files, as absolute paths."""
    return [Path(inspect.getsourcefile(type(backbone))).resolve(),
            *(ROOT / name for name in SHARED)]


def code_digest(backbone: Backbone) -> str:
    digest = hashlib.sha256()
    for path in feature_code(backbone):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
