"""The registry of dataset layouts: how :func:`read_dataset` recognises and reads each one.

A layout is a module of this package holding its reader (``read_<name>(root, **options) ->
Manifest``), its auto-detection test and one :func:`register_layout` call; the package's
``__init__`` imports it, and the import order is the order the layouts are listed in
("accepted layouts: ..."). Adding a layout: its module, its import in ``__init__``, and
its section in docs/data.md.

With ``layout="auto"`` :func:`resolve_layout` first picks the layout whose ``marker``
option was passed (the folder layout's ``normal_dir``), then asks each layout's ``detect``
by ascending ``priority`` (ties: registration order): a saved manifest, MVTec, VisA,
LabelMe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ...errors import DataValidationError, UserError
from ...registries import Registry
from ..manifest import Manifest
from .common import PathLike


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str  # one line: what it looks like on disk (its item in "accepted layouts: ...")
    # (dataset path or None, the options read_dataset got) -> the manifest
    read: Callable[[Optional[PathLike], dict], Manifest]
    options: tuple[str, ...] = ()  # the options it accepts (LAYOUT_OPTIONS)
    path_options: tuple[str, ...] = ()  # those naming a file or folder, relative to the dataset root
    # layout="auto": does this existing dataset path hold the layout? (tried by ascending priority)
    detect: Optional[Callable[[Path], bool]] = None
    priority: int = 100
    marker: Optional[str] = None  # layout="auto": an option whose presence selects this layout
    listed_as: Optional[str] = None  # its item in "accepted layouts: ..." when not "'<name>' (<summary>)"

    @property
    def help(self) -> str:
        return self.listed_as or f"{self.name!r} ({self.summary})"


LAYOUTS: Registry[Layout] = Registry(
    "dataset layout", unknown=lambda name: f"unknown dataset layout {name!r}; " + accepted_layouts_help())


def register_layout(layout: Layout) -> Layout:
    return LAYOUTS.add(layout)


def get_layout(name: str) -> Layout:
    return LAYOUTS.lookup(name)


def accepted_layouts_help() -> str:
    """``accepted layouts: 'mvtec' (...), ..., or a manifest.json file (docs/data.md)``."""
    items = [layout.help for layout in LAYOUTS.values()]
    listed = ", ".join(items[:-1]) + ", or " + items[-1] if len(items) > 1 else "".join(items)
    return f"accepted layouts: {listed} (docs/data.md)"


class _LayoutOptions(Mapping):
    """``{layout name: the options it accepts}``, read from the registry."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return LAYOUTS[name].options

    def __iter__(self) -> Iterator[str]:
        return iter(LAYOUTS)

    def __len__(self) -> int:
        return len(LAYOUTS)

    def __repr__(self) -> str:
        return repr(dict(self))


class _PathOptions(Sequence):
    """Every registered layout's path options, in registration order, each once."""

    def _all(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o for layout in LAYOUTS.values() for o in layout.path_options))

    def __getitem__(self, i):
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return repr(self._all())


#: Options each layout accepts (``read_dataset(path, layout, **options)``; the settings'
#: ``data.layout_options``).
LAYOUT_OPTIONS: Mapping[str, tuple[str, ...]] = _LayoutOptions()
#: Options that name a file or folder: relative values are relative to the dataset root.
PATH_OPTIONS: Sequence[str] = _PathOptions()


def coerce_options(layout: str, kw: dict) -> dict:
    """Check option names; turn option strings from settings files into their types."""
    accepted = LAYOUT_OPTIONS.get(layout, ())
    unknown = sorted(k for k in kw if k not in accepted)
    if unknown:
        raise UserError(f"the {layout} layout takes {', '.join(accepted) or 'no options'}; got {unknown}")
    out = {}
    for k, v in kw.items():
        try:
            if k == "test_fraction":
                v = float(v)
            elif k == "seed":
                v = int(v)
        except (TypeError, ValueError) as exc:
            raise UserError(f"layout option {k}={v!r} is not a number") from exc
        out[k] = v
    return out


def folder_reader(layout: str, read: Callable[..., Manifest]) -> Callable[[Optional[PathLike], dict], Manifest]:
    """A :attr:`Layout.read` for ``read(root, **options)``: the dataset folder is required and
    the options are checked and typed (:func:`coerce_options`)."""
    def read_folder_layout(path: Optional[PathLike], options: dict) -> Manifest:
        if path is None:
            raise UserError(f"the {layout} layout needs the dataset folder")
        return read(path, **coerce_options(layout, options))
    return read_folder_layout


def detect_layout(path: PathLike) -> Optional[str]:
    """The first registered layout whose ``detect`` accepts ``path`` (by ascending priority:
    ``"manifest"`` (a .json file), ``"mvtec"``, ``"visa"`` (``split_csv/1cls.csv``),
    ``"labelme"`` (a LabelMe .json below the folder)), or ``None`` when the layout cannot be
    recognised."""
    p = Path(path)
    for layout in sorted((x for x in LAYOUTS.values() if x.detect is not None), key=lambda x: x.priority):
        if layout.detect(p):
            return layout.name
    return None


def resolve_layout(path: Optional[PathLike], layout: str = "auto", options: Optional[dict] = None) -> str:
    """The layout ``read_dataset`` reads: ``layout`` itself unless it is ``"auto"``, then
    the layout whose marker option is among ``options`` (``"folder"`` for ``normal_dir``),
    else :func:`detect_layout`'s answer (DataValidationError when the path is missing or the
    layout unrecognised)."""
    if layout != "auto":
        return layout
    for candidate in LAYOUTS.values():
        if candidate.marker is not None and candidate.marker in (options or {}):
            return candidate.name
    if path is None or not Path(path).exists():
        raise DataValidationError(path, "dataset path not found")
    found = detect_layout(path)
    if found is None:
        raise DataValidationError(path, "cannot recognise the dataset layout; " + accepted_layouts_help())
    return found


def read_dataset(path: Optional[PathLike], layout: str = "auto", **kw) -> Manifest:
    """Read a dataset in any registered layout.

    ``layout``: ``"auto"`` (MVTec when ``path/train/good/`` exists, a manifest when
    ``path`` is a ``.json`` file, VisA when ``path/split_csv/1cls.csv`` exists, LabelMe
    when LabelMe .json files lie below ``path``, the folder layout when ``normal_dir`` is
    passed), ``"mvtec"``, ``"folder"`` (``path`` is the normal folder unless ``normal_dir``
    is given; other keywords go to :func:`~.folder.read_folder`), ``"labelme"``, ``"coco"``,
    ``"visa"``, ``"manifest"`` or any other registered name. Options per layout:
    :data:`LAYOUT_OPTIONS`; relative path options of the annotation layouts are relative
    to ``path``.
    """
    return get_layout(resolve_layout(path, layout, kw)).read(path, kw)
