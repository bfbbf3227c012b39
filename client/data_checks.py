"""``validate-data``: check a site folder against the data contract before any training.

Each check yields findings with a level (error, warning, info), what is wrong and how
to fix it.  Errors would make adaptation fail or its numbers meaningless (unreadable
files, a modality mismatch, evaluation images leaking into the training pairs);
warnings are legal but worth a look (no TI pairs, mixed sizes, transductive eval).
Images are read one at a time; only their content hashes are kept.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xkt.shared.data import Modality, list_images, read_labels, read_modality, read_pairs, read_raw
from xkt.shared.errors import DataError


@dataclass(frozen=True)
class Finding:
    """One result of a check: level, the check's name, the problem and the fix."""

    level: str  # "error" | "warning" | "info"
    check: str
    message: str
    fix: str = ""


@dataclass
class SiteReport:
    """All findings for a site, plus image counts per part."""

    site: Path
    modality: Modality
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no check found an error."""
        return not any(f.level == "error" for f in self.findings)

    def to_json(self) -> dict[str, object]:
        """The report as plain data for ``--json``."""
        return {
            "ok": self.ok,
            "site": str(self.site),
            "modality": self.modality.name,
            "counts": self.counts,
            "findings": [f.__dict__ for f in self.findings],
        }


@dataclass
class _ImageScan:
    """What one pass over a group of images learned (hashes, shapes, dtypes, bad files)."""

    hashes: dict[str, Path] = field(default_factory=dict)
    duplicates: int = 0
    shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)
    dtypes: Counter[str] = field(default_factory=Counter)
    unreadable: list[Path] = field(default_factory=list)
    out_of_range: list[Path] = field(default_factory=list)


def validate_site(site: Path) -> SiteReport:
    """Run every check on a site folder and return the report (it raises only for a missing folder)."""
    if not site.is_dir():
        raise DataError(
            f"site folder {site} does not exist", hint="pass the folder that holds target/", reason="no-site"
        )
    report = SiteReport(site, read_modality(site))
    target = _check_target(site, report)
    paired = _check_pairs(site, report)
    evaluation = _check_eval(site, report)
    _check_leakage(report, target, paired, evaluation)
    return report


def _scan(paths: Iterable[Path], modality: Modality) -> _ImageScan:
    scan = _ImageScan()
    for path in paths:
        try:
            raw = read_raw(path)
        except DataError:
            scan.unreadable.append(path)
            continue
        digest = hashlib.sha256(raw.tobytes() + str(raw.shape).encode()).hexdigest()
        scan.duplicates += digest in scan.hashes
        scan.hashes.setdefault(digest, path)
        scan.shapes[raw.shape] += 1
        scan.dtypes[str(raw.dtype)] += 1
        if raw.size and float(np.max(raw)) > modality.value_range[1]:
            scan.out_of_range.append(path)
    return scan


def _report_scan(report: SiteReport, part: str, scan: _ImageScan, modality: Modality) -> None:
    add = report.findings.append
    if scan.unreadable:
        add(
            Finding(
                "error",
                part,
                f"{len(scan.unreadable)} unreadable image(s), e.g. {scan.unreadable[0]}",
                "replace or remove them",
            )
        )
    channels = {shape[2] if len(shape) == 3 else 1 for shape in scan.shapes}
    if channels - {modality.channels}:
        add(
            Finding(
                "error",
                part,
                f"images have {sorted(channels)} channel(s) but the site's modality {modality.name!r} has {modality.channels}",
                "convert the images or fix [modality] channels in site.toml",
            )
        )
    if len(scan.shapes) > 1:
        add(
            Finding(
                "warning",
                part,
                f"mixed image sizes {sorted(scan.shapes)[:3]}",
                "resize to one size (the loader resizes)",
            )
        )
    if len(scan.dtypes) > 1:
        add(Finding("warning", part, f"mixed bit depths {sorted(scan.dtypes)}", "store all images with one bit depth"))
    if scan.out_of_range:
        add(
            Finding(
                "error",
                part,
                f"{len(scan.out_of_range)} image(s) exceed value_range {modality.value_range}, e.g. {scan.out_of_range[0]}",
                "fix [modality] value_range in site.toml (for depth in mm, the sensor's maximum range)",
            )
        )
    if scan.duplicates:
        add(Finding("warning", part, f"{scan.duplicates} duplicate image(s)", "remove the copies"))


def _check_target(site: Path, report: SiteReport) -> _ImageScan:
    folder = site / "target"
    if not folder.is_dir() or not (paths := list_images(folder)):
        report.findings.append(
            Finding("error", "target", "no images in target/", "put unlabelled task images in target/")
        )
        return _ImageScan()
    report.counts["target"] = len(paths)
    scan = _scan(paths, report.modality)
    _report_scan(report, "target", scan, report.modality)
    return scan


def _check_pairs(site: Path, report: SiteReport) -> _ImageScan:
    csv_path = site / "paired" / "pairs.csv"
    if not csv_path.exists():
        report.findings.append(
            Finding("warning", "paired", "no paired/pairs.csv", "socket, tgmb-tgkt and cmcd need task-irrelevant pairs")
        )
        return _ImageScan()
    try:
        pairs = read_pairs(csv_path)
    except DataError as error:
        report.findings.append(Finding("error", "paired", error.message, error.hint))
        return _ImageScan()
    missing = [p for pair in pairs for p in (pair.source, pair.target) if not p.is_file()]
    if missing:
        report.findings.append(
            Finding("error", "paired", f"{len(missing)} paired file(s) missing, e.g. {missing[0]}", "fix pairs.csv")
        )
    present = [pair for pair in pairs if pair.source.is_file() and pair.target.is_file()]
    report.counts["pairs"] = len(pairs)
    rgb = Modality("rgb", 3, "srgb8", (0.0, 255.0))
    _report_scan(report, "paired (RGB half)", _scan((p.source for p in present), rgb), rgb)
    target_scan = _scan((p.target for p in present), report.modality)
    _report_scan(report, f"paired ({report.modality.name} half)", target_scan, report.modality)
    return target_scan


def _check_eval(site: Path, report: SiteReport) -> _ImageScan:
    csv_path = site / "eval" / "labels.csv"
    if not csv_path.exists():
        report.findings.append(Finding("info", "eval", "no eval/labels.csv: accuracy cannot be measured", ""))
        return _ImageScan()
    try:
        rows = read_labels(csv_path)
    except DataError as error:
        report.findings.append(Finding("error", "eval", error.message, error.hint))
        return _ImageScan()
    missing = [row.path for row in rows if not row.path.is_file()]
    if missing:
        report.findings.append(
            Finding("error", "eval", f"{len(missing)} eval file(s) missing, e.g. {missing[0]}", "fix labels.csv")
        )
    report.counts["eval"] = len(rows)
    report.counts["eval_classes"] = len({row.label for row in rows})
    scan = _scan((row.path for row in rows if row.path.is_file()), report.modality)
    _report_scan(report, "eval", scan, report.modality)
    return scan


def _check_leakage(report: SiteReport, target: _ImageScan, paired: _ImageScan, evaluation: _ImageScan) -> None:
    leaked = set(evaluation.hashes) & set(paired.hashes)
    if leaked:
        report.findings.append(
            Finding(
                "error",
                "leakage",
                f"{len(leaked)} eval image(s) also appear in the task-irrelevant pairs",
                "TI pairs must come from other classes: remove those pairs",
            )
        )
    shared = set(evaluation.hashes) & set(target.hashes)
    if shared:
        report.findings.append(
            Finding(
                "warning",
                "leakage",
                f"{len(shared)} eval image(s) are also in target/: accuracy is transductive",
                "say so when reporting, or use disjoint eval images",
            )
        )
    ti_in_target = set(paired.hashes) & set(target.hashes)
    if ti_in_target:
        report.findings.append(
            Finding(
                "warning",
                "leakage",
                f"{len(ti_in_target)} TI image(s) are also in target/",
                "keep TI and task data apart",
            )
        )
