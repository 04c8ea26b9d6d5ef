"""Figures (``upbench viz <kind>``), each as PNG and PDF, from result rows, saved artefacts or the models themselves:

* ``scaling``     time and memory versus tokens (UPLiFT Fig. 1), from sweep rows
* ``pca``         one image's features, low-res and upsampled by every method, under one joint PCA (UPLiFT Fig. 10)
* ``steps``       every 2x step of the iterative methods under one joint PCA, with their drift (UPLiFT Fig. 10)
* ``predictions`` seg maps / depth maps of a few validation images, from the probes finished runs saved
* ``perclass``    per-class IoU bars of two or more methods, from seg rows
* ``train``       loss curves of ``upbench train`` runs, from their logs
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

KINDS = ("scaling", "pca", "steps", "predictions", "perclass", "train")


def from_rows(rows: Sequence[Mapping[str, Any]], results: Path, out_dir: Path,
              kinds: Sequence[str] = ("scaling", "perclass", "predictions", "train")) -> Dict[str, List[str]]:
    """Every figure the rows (and the artefacts and logs beside them) allow, by kind; kinds with nothing to draw
    are absent."""
    from . import models, rows as row_figures

    out: Dict[str, List[str]] = {}
    makers = {"scaling": lambda: row_figures.scaling(rows, out_dir),
              "perclass": lambda: row_figures.per_class(rows, out_dir),
              "predictions": lambda: models.predictions(rows, results, out_dir),
              "train": lambda: row_figures.training(row_figures.train_logs(results), out_dir)}
    for kind in kinds:
        paths = makers[kind]()
        if paths:
            out[kind] = paths
    return out


def pngs(paths: Sequence[str]) -> List[str]:
    return [p for p in paths if p.endswith(".png")]


def main_kind(kind: str, rows: Sequence[Mapping[str, Any]], results: Path, out_dir: Path,
              overrides: Sequence[str] = (), upsamplers: Optional[Sequence[str]] = None, image: int = 0,
              logs: Sequence[Path] = (), per_upsampler: Optional[Mapping[str, Sequence[str]]] = None) -> List[str]:
    """One figure kind (see the module docstring); returns the files written."""
    from . import models, rows as row_figures

    if kind == "pca":
        return models.pca(models.configs_for(upsamplers, overrides, per_upsampler), out_dir, image)
    if kind == "steps":
        return models.steps(models.configs_for(upsamplers, overrides, per_upsampler), out_dir, image)
    if kind == "train":
        return row_figures.training(list(logs) or row_figures.train_logs(results), out_dir)
    return from_rows(rows, results, out_dir, kinds=[kind]).get(kind, [])
