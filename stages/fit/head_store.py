"""Cross-fitted heads kept beside the features they were trained on, so no fit trains a
head it has trained before.

A head's training is most of a fit's time, and most fits repeat heads an earlier one
trained: ``pipeline compare`` refits the fit stage's experts under other gates, a sweep over
gate or combiner settings keeps every head, a re-run after an interrupted ``dvc repro``
keeps them all. ``HeadMemo`` keeps each cross-fitted expert (``ExpertFit``: out-of-fold and
held-out outputs, and its fold heads), and each cross-fitted linear probe, under a key
that holds everything it depends on: the task's targets, the split's rows, the seed, every
head setting, the expert's cache fingerprint (weights, cohort) and the source of
``stages/fit``. Another value of any of them is another key; nothing is ever reused across
them. On disk (``<cache>/heads/``) one file per key is written whole or not at all; an
unreadable one is trained again. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from pipeline.staging import staged_file
from stages.fit.combine import Linear
from stages.fit.crossfit import ExpertFit, ProbeFit
from stages.fit.model import ModelConfig, bag_size, make_head

log = logging.getLogger(__name__)
FOLDER = "heads"
Fit = TypeVar("Fit", ExpertFit, ProbeFit)


def _code_digest() -> str:
    """The source of stages/fit: a change to how heads train is a change of key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


CODE = _code_digest()


def head_key(*parts: object) -> str:
    """One key from values that print the same only when they are the same (strings,
    numbers, and digests of arrays), with the code's digest."""
    return hashlib.sha256(json.dumps([CODE, *parts], sort_keys=True, default=str)
                          .encode()).hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    return digest.hexdigest()


class HeadMemo:
    """Cross-fitted experts by key: in this process, and under ``root`` when given."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else None
        self.held: dict[str, ExpertFit | ProbeFit] = {}

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str, config: ModelConfig) -> ExpertFit | None:
        """The expert stored under ``key`` (its head built with ``config``, which the key
        holds), or None."""
        def build(saved: dict) -> ExpertFit:
            head = make_head(saved["d_in"], saved["d_out"],
                             replace(config, bag=saved.get("bag", 1)))
            head.load_state_dict(saved["head"])
            return ExpertFit(saved["outputs"].numpy(), head.eval())
        return self._get(key, build)

    def put(self, key: str, fit: ExpertFit, d_in: int) -> None:
        self._put(key, fit, lambda: {"d_in": d_in, "d_out": int(fit.outputs.shape[1]),
                                     "bag": bag_size(fit.head),
                                     "outputs": _tensor(fit.outputs),
                                     "head": fit.head.state_dict()})

    def get_probe(self, key: str, classification: bool, n_classes: int) -> ProbeFit | None:
        """The cross-fitted linear probe stored under ``key``, or None."""
        return self._get(key, lambda saved: ProbeFit(
            saved["outputs"].numpy(),
            Linear(json.loads(saved["linear"]), classification, n_classes)))

    def put_probe(self, key: str, fit: ProbeFit) -> None:
        self._put(key, fit, lambda: {"outputs": _tensor(fit.outputs),
                                     "linear": json.dumps(fit.linear.state)})

    def _get(self, key: str, build: Callable[[dict], Fit]) -> Fit | None:
        if key in self.held or self.root is None or not self._path(key).exists():
            return self.held.get(key)
        try:
            fit = build(torch.load(self._path(key), weights_only=True))
        except Exception as error:  # a truncated or foreign file: train it again
            log.warning("ignoring unreadable stored head %s (%s); it is trained again",
                        self._path(key), error)
            return None
        self.held[key] = fit
        return fit

    def _put(self, key: str, fit: Fit, payload: Callable[[], dict]) -> None:
        self.held[key] = fit
        if self.root is None:
            return
        try:
            with staged_file(self._path(key)) as tmp:
                torch.save(payload(), tmp)
        except OSError as error:  # a full disk, a read-only cache: the fit itself is done
            log.warning("could not store head %s (%s); a later fit trains it again",
                        self._path(key), error)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
