"""The MVTec AD layout (one category)::

    root/train/good/*                       normal training images
    root/test/good/*                        normal test images
    root/test/<defect>/*                    anomalous test images
    root/ground_truth/<defect>/<stem>_mask.png   masks (optional folder; ``<stem>.png``
                                            or any image extension is accepted too)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import DataValidationError, UserError
from ..manifest import Manifest, ManifestEntry
from .common import PathLike, _children, _find_mask, _rel
from .registry import Layout, accepted_layouts_help, register_layout


def read_mvtec(root: PathLike) -> Manifest:
    """Read an MVTec-AD-layout folder (one category) into a manifest; paths relative to root."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "dataset folder not found")
    train_good = root / "train" / "good"
    if not train_good.is_dir():
        raise DataValidationError(
            root, "no train/good/ folder, so not an MVTec-layout dataset; " + accepted_layouts_help()
        )
    for extra in _children(root / "train"):
        if extra.name != "good":
            raise DataValidationError(
                extra, "unexpected entry in train/: the MVTec layout trains on train/good/ only"
            )

    gt_root = root / "ground_truth"
    has_masks = gt_root.is_dir()
    entries: list[ManifestEntry] = []
    for p in _children(train_good):
        entries.append(ManifestEntry(path=_rel(p, root), label=0, defect_type="good", split="train"))

    test_root = root / "test"
    if test_root.is_dir():
        for defect_dir in _children(test_root):
            if not defect_dir.is_dir():
                raise DataValidationError(
                    defect_dir,
                    "unexpected file in test/: expected one subfolder per defect type "
                    "(test/good/, test/<defect>/)",
                )
            defect = defect_dir.name
            label = 0 if defect == "good" else 1
            for p in _children(defect_dir):
                mask = None
                if label == 1 and has_masks:
                    mask = _find_mask(p.stem, [gt_root / defect])
                entries.append(
                    ManifestEntry(
                        path=_rel(p, root),
                        label=label,
                        defect_type=defect,
                        mask_path=_rel(mask, root) if mask is not None else None,
                        split="test",
                    )
                )
    return Manifest(root=str(root), entries=entries, has_masks=has_masks)


def _read(path: Optional[PathLike], options: dict) -> Manifest:
    if options:
        raise UserError(f"the mvtec layout takes no options, got {sorted(options)}")
    return read_mvtec(path)


register_layout(Layout(
    "mvtec", "root/train/good/*, root/test/<defect>/*, optional root/ground_truth/<defect>/<stem>_mask.png",
    _read, detect=lambda p: (p / "train" / "good").is_dir(), priority=10,
))
