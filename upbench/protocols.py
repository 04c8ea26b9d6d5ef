"""The contracts between the core and its plugins: what an upsampler, a backbone and a task look like to the core,
what a task receives (:class:`Job`) and what it declares about its results (:class:`TableSpec`).

Plugins implement these; the core (pipeline, runner, report) types against them and finds the implementations
through :mod:`upbench.registry`, never by importing a plugin module."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch

Size = Tuple[int, int]


@runtime_checkable
class Upsampler(Protocol):
    """``forward(image, features, output_size) -> (B, C, H_out, W_out)``; ``image`` normalised with
    ``image_mean`` / ``image_std``, ``features`` (B, C, h, w).  ``family``: "interpolation", "classical"
    (training-free filters, linear in pixels), "local" or "cross-attention" (how cost grows with tokens)."""

    image_mean: Sequence[float]
    image_std: Sequence[float]
    family: str

    @property
    def num_params(self) -> int: ...

    def __call__(self, image: "torch.Tensor", features: "torch.Tensor", output_size: Any) -> "torch.Tensor": ...


@runtime_checkable
class Backbone(Protocol):
    """A frozen feature extractor: ``backbone(image) -> (features (B, C, h, w), prefix tokens (B, n, C))`` on images
    normalised with ``mean`` / ``std``; ``h = H // patch_size``.  ``identity``: a hash of everything that decides
    its outputs (its full config, weight files included), set by whoever builds it; caches key on it."""

    name: str
    channels: int
    patch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    identity: str

    def __call__(self, image: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]: ...


class Pipeline(Protocol):
    """The one data path, owned by the core (:class:`upbench.pipeline.Pipeline`) and handed to every task:
    ``image -> backbone -> features (cached) -> upsampler(image, features, output_size)``."""

    backbone: Backbone
    upsampler: Upsampler
    device: "torch.device"

    def backbone_input(self, image01: "torch.Tensor") -> "torch.Tensor": ...
    def guidance(self, image01: "torch.Tensor") -> "torch.Tensor": ...
    def encode(self, image01: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]: ...
    def features(self, image01: "torch.Tensor", key: Optional[Tuple[Any, ...]] = None) -> Tuple["torch.Tensor", "torch.Tensor"]: ...
    def item_features(self, item: Mapping[str, Any], flip: bool = False) -> Tuple["torch.Tensor", "torch.Tensor"]: ...
    def upsample(self, image01: "torch.Tensor", features: "torch.Tensor", output_size: Any) -> "torch.Tensor": ...
    def item_upsampled(self, item: Mapping[str, Any], flip: bool, output_size: Size) -> "torch.Tensor": ...
    def decode(self, latents: "torch.Tensor") -> "torch.Tensor": ...
    def timing(self) -> Dict[str, Any]: ...


# ------------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Metric:
    """One reported number: its key in ``row["metrics"]``, its column label, whether higher is better, its format."""

    key: str
    label: str
    better: str = "max"          # "max" | "min"
    fmt: str = "{:.2f}"

    def __post_init__(self) -> None:
        if self.better not in ("max", "min"):
            raise ValueError(f"Metric {self.key}: better must be 'max' or 'min', got {self.better!r}")


@dataclass(frozen=True)
class TableSpec:
    """What a task's report table looks like.  Rows are upsamplers, columns each metric per dataset.

    * ``group_by``: keys that split tables (a row field, or a dotted config path such as
      ``config.task.probe.lr_schedule``); rows that differ in one of them never share a table.
    * ``primary``: the metric a job returns to Hydra (sweepers optimise it); default the first metric.
    * ``paper``: backbone name -> key of the published table in ``assets/paper_tables.json`` (``--paper`` rows);
      ``paper_datasets`` / ``paper_metrics`` map our names to that file's where they differ.
    * ``baseline``: (row label with ``{field}`` placeholders from ``row["data"]``, metric-key suffix): one more row
      read from every run's ``<metric><suffix>`` values (e.g. t2i's images before upscaling).
    * ``group_labels``: how a ``group_by`` key is named in table titles (default: its last dotted part)."""

    title: str
    metrics: Tuple[Metric, ...]
    group_by: Tuple[str, ...] = ("backbone",)
    primary: Optional[str] = None
    paper: Mapping[str, str] = field(default_factory=dict)
    paper_datasets: Mapping[str, str] = field(default_factory=dict)
    paper_metrics: Mapping[str, str] = field(default_factory=dict)
    baseline: Optional[Tuple[str, str]] = None
    group_labels: Mapping[str, str] = field(default_factory=dict)
    position: int = 100          # where the task's tables come in a report (lower first)

    @property
    def primary_metric(self) -> Metric:
        key = self.primary or self.metrics[0].key
        return next(m for m in self.metrics if m.key == key)


@dataclass
class Job:
    """Everything a task's :meth:`Task.run` gets from the runner.

    ``cfg``: the task's own config section (plus ``seed``); ``full_cfg``: the whole resolved config (read-only);
    ``pipe``: the data path; ``train_set`` / ``val_set``: built datasets (``None`` where the task has none);
    ``checkpoint``: a file for resumable state (removed by the runner once the row is written); ``out_dir``: where
    the task may leave artefacts; ``log``: one line at a time."""

    cfg: Dict[str, Any]
    full_cfg: Dict[str, Any]
    pipe: Pipeline
    train_set: Any
    val_set: Any
    device: "torch.device"
    seed: int
    log: Callable[[str], None] = print
    checkpoint: Optional[Path] = None
    out_dir: Optional[Path] = None
    progress: bool = False


class Task:
    """A registered task (``@TASKS.register("seg")``): ``run(job) -> {"metrics", "timing", "data"}``.

    ``dataset_kinds``: the ``kind`` of dataset it accepts (``None``: any); ``dataset_hint``: how the error names what
    it needs; ``table``: its report layout; ``makes_rows``: whether the runner stores a result row for it (training
    leaves weights instead); ``fits_train_split``: whether it fits anything on the train split (a probe), so train
    and val must not share images."""

    registry_name = ""
    table: Optional[TableSpec] = None
    dataset_kinds: Optional[Tuple[str, ...]] = None
    dataset_hint: str = "another dataset"
    makes_rows: bool = True
    fits_train_split: bool = False

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        """Check what the task needs (weights, files) from the whole config before anything is built; raise
        :class:`upbench.errors.UpbenchError` naming every missing piece."""

    def run(self, job: Job) -> Dict[str, Any]:
        raise NotImplementedError
