"""Find cases in the folder layouts users already have: MM-WHS 2017 and nnU-Net v2 raw.

A :class:`Dataset` lists :class:`Case` s (image path, label path or ``None``) and the dataset's label
table (name -> value in its files). The two modalities' tables are matched **by name** with
:func:`match_labels`, so their integer ids may differ.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mkd_tf import schema
from mkd_tf.errors import fail
from mkd_tf.files import read_json

# MM-WHS 2017 label values, in the challenge's order.
MMWHS_LABELS = {
    "background": 0,
    "myocardium": 205,  # left-ventricle myocardium
    "left_atrium": 420,  # LA blood cavity
    "left_ventricle": 500,  # LV blood cavity
    "right_atrium": 550,  # RA blood cavity
    "right_ventricle": 600,  # RV blood cavity
    "ascending_aorta": 820,
    "pulmonary_artery": 850,
}
# The four structures SIFA / UMMKD report on; the others become background.
MMWHS_FOUR = ("myocardium", "left_atrium", "left_ventricle", "ascending_aorta")

_MMWHS_IMAGE = re.compile(r"^(?P<modality>[a-z]+)_(?P<split>[a-z]+)_(?P<id>\d+)_image\.nii(\.gz)?$")
_MMWHS_LABEL = re.compile(r"^(?P<modality>[a-z]+)_(?P<split>[a-z]+)_(?P<id>\d+)_label\.nii(\.gz)?$")


@dataclass
class Case:
    """One patient volume.

    Args:
        case_id: unique within its dataset, e.g. `ct_train_1001`.
        image: path of the intensity volume.
        label: path of the label volume, or `None` when the case has none.
    """

    case_id: str
    image: Path
    label: Path | None = None


@dataclass
class Dataset:
    """The cases of one modality and their label table.

    Args:
        root: the folder that was read.
        layout: `"mmwhs"` or `"nnunet"`.
        modality: e.g. `"ct"`, `"mr"` (nnU-Net: channel 0's name, lower case).
        cases: the :class:`Case` s, sorted by id.
        labels: label name -> value in the files (background included).
        label_source: the file that defined `labels` (for messages).
    """

    root: Path
    layout: str
    modality: str
    cases: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    label_source: str = ""


@dataclass(frozen=True)
class Layout:
    """A dataset folder layout, registered in :data:`LAYOUTS` (as methods are in :mod:`mkd_tf.registry`).

    Args:
        name: the ``layout`` recorded in the cache (``"mmwhs"``, ``"nnunet"``).
        recognises: ``(folder) -> bool``: whether a folder is of this layout.
        read: ``(folder, modality or None) -> Dataset``: its cases and label table; fails with one line
            naming the file on anything malformed.
        defined_labels: ``(modality record of the cache) -> {name: value}``: every label the dataset
            defines, kept or not (evaluation maps the other values of a reference file to background).
        summary: one line for the docs.
    """

    name: str
    recognises: Callable[[Path], bool]
    read: Callable[[Path, str | None], "Dataset"]
    defined_labels: Callable[[dict], dict]
    summary: str


#: the registered layouts, in the order :func:`discover` tries them
LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Register ``layout`` (see :class:`Layout`); returns it."""
    if layout.name in LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout
    return layout


def discover(path, modality=None):
    """Detect the layout of ``path`` (the first registered :class:`Layout` that recognises it) and list its cases.

    Args:
        path: an MM-WHS modality folder (`ct_train/`), an MM-WHS root holding `ct_train/` and
            `mr_train/`, or an nnU-Net v2 raw dataset folder (`dataset.json`, `imagesTr/`, `labelsTr/`).
        modality: for an MM-WHS root, which modality folder to read (`"ct"`, `"mr"`).

    Returns:
        :class:`Dataset`.
    """
    root = Path(path)
    if not root.exists():
        fail(root, "folder not found")
    if not root.is_dir():
        fail(root, "not a folder")
    for layout in LAYOUTS.values():
        if layout.recognises(root):
            return layout.read(root, modality)
    if not any(root.iterdir()):
        fail(root, "folder is empty")
    fail(root, "not an MM-WHS 2017 folder (*_image.nii.gz) nor an nnU-Net v2 raw folder (dataset.json, imagesTr/)")


def defined_labels(modality: dict) -> dict:
    """Every label value the dataset behind a cache's modality record defines, kept or not, name -> value."""
    values = dict(modality["label_values"])
    values.update(LAYOUTS[modality["layout"]].defined_labels(modality))
    return values


# --- MM-WHS 2017 -------------------------------------------------------------------------------------
def _mmwhs_train_folders(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir() and re.match(r"^[a-z]+_train$", p.name))


def _is_mmwhs(root):
    """A modality folder (``*_image.nii.gz``) or a root holding ``<modality>_train/`` folders."""
    return any(_MMWHS_IMAGE.match(p.name) for p in root.iterdir()) or bool(_mmwhs_train_folders(root))


def _read_mmwhs(root, modality):
    if any(_MMWHS_IMAGE.match(p.name) for p in root.iterdir()):
        return _mmwhs_folder(root)
    folders = _mmwhs_train_folders(root)
    if modality is None:
        fail(root, f"MM-WHS root holds {', '.join(folders)}: choose one with --target-modality/--assistant-modality")
    folder = root / f"{modality.lower()}_train"
    if not folder.is_dir():
        fail(root, f"no {modality.lower()}_train/ folder (found {', '.join(folders)})")
    return _mmwhs_folder(folder)


def _mmwhs_folder(folder):
    images, labels, modalities = {}, {}, set()
    for path in sorted(folder.iterdir()):
        for pattern, found in ((_MMWHS_IMAGE, images), (_MMWHS_LABEL, labels)):
            match = pattern.match(path.name)
            if not match:
                continue
            case_id = f"{match['modality']}_{match['split']}_{match['id']}"
            if case_id in found:
                fail(
                    path,
                    f"a second {'image' if found is images else 'label'} file of case {case_id} "
                    f"(the other is {found[case_id].name}); keep one",
                )
            found[case_id] = path
            if found is images:
                modalities.add(match["modality"])
    if not images:
        fail(folder, "no *_image.nii.gz cases found")
    if len(modalities) > 1:
        fail(folder, f"mixes modalities {sorted(modalities)}")
    for case_id, label in labels.items():
        if case_id not in images:
            expected = label.with_name(label.name.replace("_label.", "_image."))
            fail(label, f"label file without its image (expected {expected})")
    cases = [Case(case_id, image, labels.get(case_id)) for case_id, image in sorted(images.items())]
    return Dataset(folder, "mmwhs", modalities.pop(), cases, dict(MMWHS_LABELS), "MM-WHS 2017 label values")


_CHANNELS = schema.mapping(values=schema.text(), required=False)  # channel number ("0") -> modality name
#: what this package reads of an nnU-Net v2 ``dataset.json`` (other keys are nnU-Net's own and ignored)
DATASET_JSON = {
    "labels": schema.mapping(values=schema.integer(0)),
    "channel_names": _CHANNELS,
    "modality": _CHANNELS,  # nnU-Net v1's name of channel_names
    "file_ending": schema.text(required=False),
    "numTraining": schema.integer(0, required=False),
}


def check_dataset_json(path, spec):
    """Fail with one line naming ``path`` and the key unless ``spec`` fits :data:`DATASET_JSON`, its labels
    include background 0 and no two labels share a value (one of them would silently get no voxels)."""
    if isinstance(spec, dict) and isinstance(spec.get("labels"), dict):
        for name, value in spec["labels"].items():
            if isinstance(value, list):
                fail(path, f"key 'labels.{name}' is a region {value!r}; only integer labels are supported")
    schema.validate(path, spec, DATASET_JSON)
    labels = spec["labels"]
    if not labels:
        fail(path, 'key \'labels\' is empty (expected {"background": 0, "name": 1, ...})')
    seen = {}
    for name, value in labels.items():
        if value in seen:
            fail(path, f"key 'labels' gives {seen[value]} and {name} the same value {value}")
        seen[value] = name
    if 0 not in seen:
        fail(path, "key 'labels' has no background (value 0)")


def _read_nnunet(root, modality=None):
    spec_path = root / "dataset.json"
    if not spec_path.exists():
        fail(root, "nnU-Net folder has no dataset.json")
    spec = read_json(spec_path)
    check_dataset_json(spec_path, spec)
    labels = spec["labels"]
    channels = spec.get("channel_names") or spec.get("modality") or {"0": "unknown"}
    modality = str(channels.get("0", "unknown")).lower()
    ending = spec.get("file_ending", ".nii.gz")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        fail(root, "nnU-Net folder has no imagesTr/")
    if labels_dir.exists() and not labels_dir.is_dir():
        fail(labels_dir, "is not a folder (expected labelsTr/ holding the label files)")
    cases = []
    for image in sorted(images_dir.glob(f"*_0000{ending}")):
        case_id = image.name[: -len(f"_0000{ending}")]
        label = labels_dir / f"{case_id}{ending}"
        cases.append(Case(case_id, image, label if label.exists() else None))
    if not cases:
        fail(images_dir, f"no *_0000{ending} images found")
    if labels_dir.is_dir():
        known = {case.case_id for case in cases}
        for label in sorted(labels_dir.glob(f"*{ending}")):
            case_id = label.name[: -len(ending)]
            if case_id not in known:
                fail(label, f"label file without its image (expected {images_dir / (case_id + '_0000' + ending)})")
    return Dataset(root, "nnunet", modality, cases, {str(k): v for k, v in labels.items()}, str(spec_path))


def _is_nnunet(root):
    return (root / "dataset.json").exists() or (root / "imagesTr").is_dir()


def _nnunet_labels(modality):
    """The labels of the ``dataset.json`` the cache was prepared from, when it is still there."""
    source = Path(modality.get("label_source", ""))
    return read_json(source)["labels"] if source.name == "dataset.json" and source.exists() else {}


# nnU-Net first: an nnU-Net folder may hold anything next to dataset.json
register_layout(
    Layout("nnunet", _is_nnunet, _read_nnunet, _nnunet_labels, "nnU-Net v2 raw: dataset.json, imagesTr/, labelsTr/")
)
register_layout(
    Layout(
        "mmwhs",
        _is_mmwhs,
        _read_mmwhs,
        lambda modality: dict(MMWHS_LABELS),
        "MM-WHS 2017: <modality>_train/<modality>_train_<id>_image.nii.gz and _label.nii.gz",
    )
)


def structure_names(dataset, structures=None):
    """The foreground names of ``dataset`` to keep: all, or MM-WHS's 4-structure set (`structures=4`)."""
    names = [name for name, value in dataset.labels.items() if value != 0]
    if structures in (None, 0) or structures == len(names):
        return names
    if structures == 4 and dataset.layout == "mmwhs":
        return list(MMWHS_FOUR)
    fail(dataset.root, f"--structures {structures} is not available (dataset has {len(names)} structures)")


def match_labels(target, assistant, structures=None, ignore_unmatched=False):
    """Match the two modalities' structures by name.

    Args:
        target, assistant: :class:`Dataset` s.
        structures: `7`/`None` for all, `4` for MM-WHS's MYO/LA/LV/AA.
        ignore_unmatched: keep only names present in both instead of failing.

    Returns:
        Class names, background first: index `i` is class `i` in the cache and the models.
    """
    target_names = structure_names(target, structures)
    assistant_names = structure_names(assistant, structures)
    only_target = [n for n in target_names if n not in assistant_names]
    only_assistant = [n for n in assistant_names if n not in target_names]
    if (only_target or only_assistant) and not ignore_unmatched:
        parts = []
        if only_target:
            parts.append(f"{only_target} only in target {target.label_source}")
        if only_assistant:
            parts.append(f"{only_assistant} only in assistant {assistant.label_source}")
        fail(
            target.label_source,
            "label names do not match across modalities: "
            + "; ".join(parts)
            + " (use --ignore-unmatched to drop them)",
        )
    common = [n for n in target_names if n in assistant_names]
    if not common:
        fail(target.label_source, "the two modalities share no label names")
    return ["background"] + common
