"""``end2reg import-ct``: a CT segmentation label map -> a model folder (one mesh per level).

Reads a label map (NIfTI ``.nii``/``.nii.gz`` via nibabel; NRRD ``.nrrd``/``.nhdr`` via
pynrrd), takes one label value per lumbar level (presets or ``--labels L1=..``), and
writes one triangle mesh per level into a folder that :func:`end2reg_ros.data.specimen_io.
load_specimen` reads: ``L1.ply`` .. ``L5.ply``, an empty ``targets.csv`` and
``ct_import.json`` (what was done, and the frame of the meshes).

Frames: meshes are in the scanner's **physical (patient) coordinates** in millimetres, from
the image affine (voxel index -> world). NIfTI affines map to **RAS** (+x right, +y
anterior, +z superior); NRRD files state their space (``left-posterior-superior`` or
``right-anterior-superior``; other spaces are refused). The output
frame is chosen with ``--frame``: ``lps`` (default; DICOM patient coordinates, what 3D
Slicer's markups files and most planning software store) or ``ras`` (NIfTI's). The
surgical plan must be given in the same frame. LPS = diag(-1, -1, 1) RAS.

Surface: per level the binary mask (components smaller than 1 % of the level's voxels
dropped as specks), a Gaussian blur of :data:`BLUR_SIGMA_VOXELS` voxels, marching cubes at
0.5 (scikit-image) in voxel indices, mapped through the full affine (oblique and
anisotropic voxels are fine), outward-facing triangles, Taubin smoothing (no shrinking)
and quadric decimation to at most ``--triangles`` triangles per level (open3d).

Presets (label value per level):

* ``totalsegmentator``: TotalSegmentator v2 task ``total``: vertebrae_L5..L1 = 27..31.
* ``totalsegmentator-v1``: TotalSegmentator v1 ``total``: vertebrae_L5..L1 = 18..22.
* ``verse``: VerSe challenge labels 20..24 = L1..L5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from end2reg_ros.types import LEVELS, Specimen, Vertebra

PRESETS: dict[str, dict[str, int]] = {
    "totalsegmentator": {"L1": 31, "L2": 30, "L3": 29, "L4": 28, "L5": 27},
    "totalsegmentator-v1": {"L1": 22, "L2": 21, "L3": 20, "L4": 19, "L5": 18},
    "verse": {"L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24},
}
FRAMES = ("lps", "ras")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
BLUR_SIGMA_VOXELS = 0.5
MIN_COMPONENT_FRACTION = 0.01
DEFAULT_TRIANGLES = 10000
DEFAULT_SMOOTHING = 10
INFO_FILE = "ct_import.json"
SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


@dataclass
class LabelMap:
    """Integer label volume (I, J, K) and ``ras_from_ijk`` (4x4: voxel index -> RAS mm)."""

    labels: np.ndarray
    ras_from_ijk: np.ndarray
    path: str

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.ras_from_ijk[:3, :3], axis=0)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _integer_labels(data: np.ndarray, where: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D label map, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.all(np.isfinite(data)) or np.max(np.abs(data - rounded)) > 1e-3:
            raise ValueError(
                f"{where}: values are not integer labels (is this the CT image rather than its "
                "segmentation?)"
            )
        data = rounded.astype(np.int32)
    return data


def read_label_map(path: str | Path) -> LabelMap:
    """Read a NIfTI or NRRD label map. ValueError on unknown types or bad content."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: label map does not exist")
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types
            raise ValueError(f"{path}: cannot read NIfTI ({exc})") from exc
        header = img.header
        if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
            raise ValueError(
                f"{path}: the NIfTI header has neither sform nor qform: the voxels' positions "
                "in the scanner are unknown"
            )
        labels = _integer_labels(np.asanyarray(img.dataobj), str(path))
        return LabelMap(labels, np.asarray(img.affine, dtype=float), str(path))
    if suffix in (".nrrd", ".nhdr"):
        try:
            import nrrd
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError(f"{path}: reading NRRD needs pynrrd (pip install pynrrd)") from exc
        try:
            data, header = nrrd.read(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path}: cannot read NRRD ({exc})") from exc
        space = str(header.get("space", "")).lower()
        if space in ("left-posterior-superior", "lps"):
            ras_from_space = np.diag([-1.0, -1.0, 1.0])
        elif space in ("right-anterior-superior", "ras"):
            ras_from_space = np.eye(3)
        else:
            raise ValueError(
                f"{path}: NRRD space {space or '(none)'!r} is not LPS or RAS: cannot place the "
                "voxels in patient coordinates"
            )
        directions = np.asarray(header.get("space directions"), dtype=float)
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
        if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
            raise ValueError(f"{path}: expected 3 spatial axes with 'space directions'")
        affine = np.eye(4)
        affine[:3, :3] = ras_from_space @ directions.T  # column a: step of index a
        affine[:3, 3] = ras_from_space @ origin
        return LabelMap(_integer_labels(data, str(path)), affine, str(path))
    raise ValueError(
        f"{path}: unknown file type {suffix or '(none)'!r}; label maps must be "
        f"{', '.join(SUFFIXES)}"
    )


def parse_labels(text: str) -> dict[str, int]:
    """``"L1=20,L2=21"`` -> {"L1": 20, "L2": 21}. ValueError on bad syntax or levels."""
    out: dict[str, int] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        level, sep, value = item.partition("=")
        level = level.strip().upper()
        if not sep or level not in LEVELS:
            raise ValueError(f"--labels: {item!r} must be LEVEL=VALUE with LEVEL one of "
                             f"{', '.join(LEVELS)}")
        try:
            out[level] = int(value)
        except ValueError as exc:
            raise ValueError(f"--labels: {item!r}: the value must be an integer") from exc
        if out[level] <= 0:
            raise ValueError(f"--labels: {item!r}: 0 is background; values must be positive")
    if not out:
        raise ValueError("--labels: no LEVEL=VALUE pairs given")
    if len(set(out.values())) != len(out):
        raise ValueError("--labels: two levels share one label value")
    return out


def _mask_surface(
    mask: np.ndarray, ras_from_ijk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Marching-cubes surface of a binary mask, in RAS mm, outward triangles; also the
    number of dropped speck components."""
    from scipy import ndimage
    from skimage.measure import marching_cubes

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    dropped = 0
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.sum()) + 1
        dropped = count - len(keep)
        mask = np.isin(components, keep)
    idx = np.argwhere(mask)
    lo = idx.min(0)
    hi = idx.max(0) + 1
    pad = 3
    crop = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32), pad)
    crop = ndimage.gaussian_filter(crop, BLUR_SIGMA_VOXELS)
    verts, faces, _, _ = marching_cubes(crop, level=0.5)
    ijk = verts.astype(float) + lo - pad
    ras = ijk @ ras_from_ijk[:3, :3].T + ras_from_ijk[:3, 3]
    faces = faces.astype(np.int64)
    tri = ras[faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if signed_volume < 0:
        faces = faces[:, ::-1]
    return ras, np.ascontiguousarray(faces), dropped


def _smooth_and_decimate(
    vertices: np.ndarray, faces: np.ndarray, smoothing: int, max_triangles: int
) -> tuple[np.ndarray, np.ndarray]:
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces.astype(np.int32))
    )
    mesh.remove_duplicated_vertices()
    mesh.remove_degenerate_triangles()
    if smoothing > 0:
        mesh = mesh.filter_smooth_taubin(number_of_iterations=int(smoothing))
    if len(mesh.triangles) > max_triangles:
        mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=int(max_triangles))
    mesh.remove_degenerate_triangles()
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices, dtype=float), np.asarray(mesh.triangles, dtype=np.int64)


def label_map_to_specimen(
    label_map: LabelMap,
    mapping: dict[str, int],
    frame: str = "lps",
    max_triangles: int = DEFAULT_TRIANGLES,
    smoothing: int = DEFAULT_SMOOTHING,
    skip_missing: bool = False,
    progress: Callable[[str], None] | None = print,
) -> Specimen:
    """One mesh per level of ``mapping`` (level -> label value), in the scanner's ``frame``
    (``lps`` or ``ras``), millimetres. ``user_from_spine`` of the result is the identity:
    the meshes are in the user's (scanner) frame, not yet in the spine frame."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    say = progress or (lambda _msg: None)
    out_from_ras = LPS_FROM_RAS if frame == "lps" else np.eye(4)
    present = np.unique(label_map.labels)
    present = present[present != 0]
    missing = [lv for lv in LEVELS if lv in mapping and mapping[lv] not in present]
    if missing and not skip_missing:
        raise ValueError(
            f"{label_map.path}: no voxels for {', '.join(f'{lv} (label {mapping[lv]})' for lv in missing)}; "
            f"labels present: {', '.join(str(int(v)) for v in present[:40]) or 'none'}"
            + (" ..." if len(present) > 40 else "")
            + ". Check the preset/--labels, or pass --skip-missing to import the other levels."
        )
    levels = [lv for lv in LEVELS if lv in mapping and lv not in missing]
    if not levels:
        raise ValueError(f"{label_map.path}: none of the requested levels has voxels")
    spacing = label_map.spacing_mm
    say(f"{label_map.path}: {label_map.labels.shape} voxels of "
        f"{' x '.join(f'{s:.3g}' for s in spacing)} mm; levels {', '.join(levels)}"
        + (f" (missing: {', '.join(missing)})" if missing else ""))
    vertebrae = []
    for level in levels:
        t0 = time.perf_counter()
        mask = label_map.labels == mapping[level]
        n_voxels = int(mask.sum())
        ras, faces, dropped = _mask_surface(mask, label_map.ras_from_ijk)
        verts = ras @ out_from_ras[:3, :3].T
        verts, faces = _smooth_and_decimate(verts, faces, smoothing, max_triangles)
        say(f"  {level} (label {mapping[level]}): {n_voxels} voxels"
            + (f", {dropped} speck(s) dropped" if dropped else "")
            + f" -> {len(faces)} triangles ({time.perf_counter() - t0:.1f} s)")
        vertebrae.append(Vertebra(level=level, vertices=verts, faces=faces))
    return Specimen(name=Path(label_map.path).name.split(".")[0], vertebrae=vertebrae)


def check_level_order(specimen: Specimen, frame: str) -> list[str]:
    """Warnings when the levels do not run from superior (L1) to inferior (L5) along the
    scanner's S axis (z in both LPS and RAS): a label mapping that does not fit the image."""
    centroids = [v.vertices.mean(axis=0) for v in specimen.vertebrae]
    warnings = []
    for a, b, ca, cb in zip(specimen.vertebrae, specimen.vertebrae[1:], centroids, centroids[1:]):
        if ca[2] <= cb[2]:
            warnings.append(
                f"{a.level} is not superior of {b.level} in the {frame.upper()} frame "
                f"(z {ca[2]:.0f} vs {cb[2]:.0f} mm): wrong label values, or a CT whose S axis "
                "does not point to the head?"
            )
    return warnings


def import_ct(
    labels_path: str | Path,
    out_dir: str | Path,
    mapping: dict[str, int],
    frame: str = "lps",
    max_triangles: int = DEFAULT_TRIANGLES,
    smoothing: int = DEFAULT_SMOOTHING,
    skip_missing: bool = False,
    progress: Callable[[str], None] | None = print,
    plan_path: str | Path | None = None,
) -> Path:
    """Label map file -> model folder (module docstring). Returns the folder.

    Afterwards the folder is loaded as the node will load it, and the derived spine frame is
    reported (or a warning when it cannot be derived). With ``plan_path`` the plan is
    validated against the meshes (levels present, entry points on their vertebra, same
    frame) and copied into the folder as ``plan.csv``/``plan.json``."""
    import shutil

    from end2reg_ros.data.specimen_io import load_specimen, save_specimen
    from end2reg_ros.plan import read_plan

    say = progress or (lambda _msg: None)
    label_map = read_label_map(labels_path)
    specimen = label_map_to_specimen(
        label_map, mapping, frame, max_triangles, smoothing, skip_missing, progress
    )
    for warning in check_level_order(specimen, frame):
        say(f"WARNING: {warning}")
    out_dir = Path(out_dir)
    save_specimen(specimen, out_dir)
    info = {
        "source": str(Path(labels_path).resolve()),
        "frame": frame.upper(),
        "frame_note": (
            f"meshes are in the scanner's {frame.upper()} patient coordinates, millimetres "
            "(NIfTI affines are RAS; LPS = diag(-1,-1,1) RAS)"
        ),
        "units": "mm",
        "labels": {lv: mapping[lv] for lv in specimen.levels},
        "voxel_spacing_mm": [float(s) for s in label_map.spacing_mm],
        "triangles": {v.level: len(v.faces) for v in specimen.vertebrae},
        "smoothing_iterations": smoothing,
    }
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    try:
        model = load_specimen(out_dir, frame="user")
    except ValueError as exc:
        model = None
        say(f"WARNING: the spine frame cannot be derived from these meshes ({exc})")
    else:
        origin = model.user_from_spine[:3, 3]
        caudal, posterior = model.user_from_spine[:3, 1], model.user_from_spine[:3, 2]
        say(f"spine frame derived: origin {np.round(origin, 1).tolist()} mm, caudal axis "
            f"{np.round(caudal, 3).tolist()}, posterior axis {np.round(posterior, 3).tolist()} "
            f"({frame.upper()})")
    if plan_path is not None:
        plan = read_plan(plan_path)
        if model is None:
            model = load_specimen(out_dir, frame="package")
        plan.check_levels(model.levels)
        plan.check_near_model(model)
        target = out_dir / f"plan{Path(plan_path).suffix.lower()}"
        if Path(plan_path).resolve() != target.resolve():
            shutil.copyfile(plan_path, target)
        say(f"plan: {len(plan)} trajectories ({', '.join(plan.names)}) checked against the "
            f"meshes and copied to {target}")
    say(f"wrote {', '.join(specimen.levels)} to {out_dir} in {frame.upper()} scanner "
        "coordinates (mm); give the plan in the same frame")
    return out_dir


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", help="label map: .nii, .nii.gz, .nrrd or .nhdr")
    parser.add_argument("--out", required=True, help="model folder to write (L1.ply .. L5.ply)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="label values: totalsegmentator (v2: L1..L5 = 31..27), "
                             "totalsegmentator-v1 (22..18), verse (20..24)")
    parser.add_argument("--labels", dest="label_values", metavar="L1=..,L2=..",
                        help="explicit label value per level (overrides the preset's)")
    parser.add_argument("--frame", choices=FRAMES, default="lps",
                        help="coordinates of the output meshes: scanner LPS (default) or RAS")
    parser.add_argument("--triangles", type=int, default=DEFAULT_TRIANGLES,
                        help="most triangles per vertebra after decimation")
    parser.add_argument("--smoothing", type=int, default=DEFAULT_SMOOTHING,
                        help="Taubin smoothing iterations (0: none)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="import the levels that have voxels instead of failing")
    parser.add_argument("--plan", metavar="PLAN",
                        help="plan.csv/plan.json in the same frame (mm): check it against the "
                             "meshes and copy it into the model folder")


def run(args: argparse.Namespace) -> int:
    try:
        if not args.preset and not args.label_values:
            raise ValueError("give --preset or --labels L1=..,L2=.. (which label is which level)")
        mapping = dict(PRESETS[args.preset]) if args.preset else {}
        if args.label_values:
            mapping.update(parse_labels(args.label_values))
        if args.triangles < 100:
            raise ValueError("--triangles must be at least 100")
        import_ct(args.labels, args.out, mapping, args.frame, args.triangles, args.smoothing,
                  args.skip_missing, progress=lambda m: print(m, flush=True),
                  plan_path=args.plan)
    except ValueError as exc:
        print(f"end2reg import-ct: error: {exc}", file=sys.stderr)
        return 2
    return 0
