"""The ``binding`` benchmark: generated MP4 clips (H.264 + AAC) whose labels need cross-modal binding.

Every clip is 8 frames of 32×32 RGB at 8 fps (1 s) on black, with a mono 16 kHz AAC track. Objects
are 7×7 sprites of four shapes (:data:`SHAPES`: filled square, 1 px hollow ring, plus with 3 px arms,
diagonal x about 2 px thick), each in its own random bright colour (uniform RGB with a channel ≥ 160,
drawn independently of every label).

``kind="binding"`` (the benchmark): two objects of different shapes. ``M`` moves 2 px per frame in
one of :data:`DIRECTIONS` (14 px over the clip), ``S`` stands still. M is visible in 4 random frames,
S in the other 4 (each frame shows one object). One of the two (50/50) sounds: a sine of one of
:data:`PITCHES` (amplitude 0.5, 5 ms raised-cosine ramps) on exactly during the frames it is visible
(frame ``k`` covers ``[k/8, (k+1)/8)`` s). Labels: ``motion = shape(M)·4 + direction`` and
``sound = shape(sounding)·4 + pitch`` (16 classes each). Positions: M's time-averaged top-left and
S's top-left are both uniform over the central square ``[7, 18]²`` (the range a 14 px path allows
on its axis), at least 8 px apart on both axes, so that S is 1 px clear of every path M could take
and the pair is exchangeable: neither the time-averaged position, nor S's position, nor "which
object is more central" tells the direction or which object moves.

``kind="pretrain"`` (single-modality pre-training of the experts): one object of a random shape
moving in a random direction (time-averaged top-left uniform over ``[7, 18]²``), visible in a
random 4 to 8 of the 8 frames, a tone of a random pitch on while it is visible. Labels ``shape``,
``direction``, ``pitch`` (4 classes each).

Clip ``i`` of ``(kind, split, seed)`` draws everything from its own generator
(:func:`clip_rng`), so a set is the same wherever and however often it is generated, and splits
never share clips. :func:`write_binding` writes a set once (cached, see its docstring);
``DATASETS["binding"]`` (:class:`BindingDataset`) generates on first use and reads it as a
:class:`~fusionkit.data.dataset.ManifestDataset`.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.data.dataset import ManifestDataset
from fusionkit.data.encode import write_video
from fusionkit.registry import DATASETS

VERSION = 2  # bump whenever the generated clips change: it names the cache folder and is checked in meta.json
KINDS = ("binding", "pretrain")
SPLITS = ("train", "val", "test")
DEFAULT_COUNTS = {"train": 16000, "val": 2000, "test": 2000}
SHAPES = ("square", "ring", "plus", "x")
DIRECTIONS = ("right", "left", "down", "up")
PITCHES = (250, 500, 1000, 2000)  # Hz
HEADS = {"binding": ("motion", "sound"), "pretrain": ("shape", "direction", "pitch")}
FRAMES, SIZE, FPS, SAMPLE_RATE = 8, 32, 8, 16000
SPRITE, SPEED = 7, 2  # sprite side and motion per frame (px)
STEPS = np.array([(0, SPEED), (0, -SPEED), (SPEED, 0), (-SPEED, 0)])  # (dy, dx) per frame, in DIRECTIONS order
HALF_PATH = SPEED * (FRAMES - 1) // 2  # 7 px from the start to the time-averaged position
MEAN_RANGE = np.arange(HALF_PATH, SIZE - SPRITE - HALF_PATH + 1)  # 7..18: time-averaged top-left coordinates
GAP = SPRITE + 1  # M (time-averaged) and S are >= 8 px apart on both axes: S is 1 px clear of any path of M
PAIRS = np.array([(a, b) for a in MEAN_RANGE for b in MEAN_RANGE if abs(a - b) >= GAP])  # (20, 2) per axis
AMPLITUDE, RAMP = 0.5, 0.005  # tone amplitude, raised-cosine ramp (s)
BRIGHT = 160  # a colour's brightest channel is at least this
# libx264, lossless (crf 0), one keyframe per clip (gop = FRAMES). Lossy settings made the data differ
# between calls: x264 does not always take the same decisions for the same frames (measured at crf 1:
# a few clips per thousand, decoded pixels up to 3 levels apart), so stages trained on two generations
# of one set diverged. Lossless, the decoded frames are the encoder's yuv420p input, whatever it decides.
ENCODER = {"crf": "0", "bf": "0", "threads": "1"}
AUDIO_ENCODER = {"aac_coder": "fast"}  # half the time of the default coder; pure tones stay > 39 dB SNR
MANIFEST, FACTS, META = "manifest.csv", "facts.csv", "meta.json"


def _sprites() -> np.ndarray:
    """bool ``(4, 7, 7)``: the masks of :data:`SHAPES`."""
    r, c = np.mgrid[:SPRITE, :SPRITE]
    mid, edge = SPRITE // 2, SPRITE - 1
    square = np.ones((SPRITE, SPRITE), dtype=bool)
    ring = (r == 0) | (c == 0) | (r == edge) | (c == edge)
    plus = (abs(r - mid) <= 1) | (abs(c - mid) <= 1)
    x = (abs(r - c) <= 1) | (abs(r + c - edge) <= 1)
    return np.stack([square, ring, plus, x])


SPRITES = _sprites()


def clip_rng(kind: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of a set: a function of ``(seed, kind, split, index)`` only."""
    return np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind), SPLITS.index(split), index]))


def class_names(kind: str) -> dict[str, list[str]]:
    """Head → class names in label order (``motion``: ``square-right``, ``square-left``, ...)."""
    if kind == "binding":
        return {"motion": [f"{s}-{d}" for s in SHAPES for d in DIRECTIONS],
                "sound": [f"{s}-{p}Hz" for s in SHAPES for p in PITCHES]}
    return {"shape": list(SHAPES), "direction": list(DIRECTIONS), "pitch": [f"{p}Hz" for p in PITCHES]}


def render_clip(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """One clip: frames uint8 ``(8, 32, 32, 3)``, audio float32 ``(16000,)`` and its labels
    (:func:`sample_clip`)."""
    labels = sample_clip(kind, rng)
    return (*paint(kind, labels), labels)


def sample_clip(kind: str, rng: np.random.Generator) -> dict[str, int]:
    """The labels of one clip: its heads (:data:`HEADS`) and the facts that :func:`paint` draws from.

    ``binding``: ``moving_shape``, ``still_shape``, ``direction``, ``sounding`` (0: M, 1: S), ``pitch``,
    M's top-left ``m_y, m_x`` at frame 0, S's ``s_y, s_x``, colours ``m_r … s_b`` and ``m_frames`` (bit
    ``k`` set when M is visible in frame ``k``; S is visible in the others). ``pretrain``: ``shape``,
    ``direction``, ``pitch``, ``y, x``, ``r, g, b``, ``frames``.
    """
    if kind == "binding":
        return _sample_binding(rng)
    if kind == "pretrain":
        return _sample_pretrain(rng)
    raise ValueError(f"binding: kind must be one of {KINDS}, got {kind!r}")


def _sample_binding(rng: np.random.Generator) -> dict[str, int]:
    moving, still = (int(v) for v in rng.choice(len(SHAPES), 2, replace=False))
    direction = int(rng.integers(len(DIRECTIONS)))
    (my, sy), (mx, sx) = PAIRS[rng.integers(len(PAIRS), size=2)]
    start = _start(np.array([my, mx]), direction)
    m_on = _visible(rng, FRAMES // 2)
    m_rgb, s_rgb = _colour(rng), _colour(rng)
    sounding, pitch = int(rng.integers(2)), int(rng.integers(len(PITCHES)))
    return {"motion": moving * len(DIRECTIONS) + direction,
            "sound": (moving if sounding == 0 else still) * len(PITCHES) + pitch,
            "moving_shape": moving, "still_shape": still, "direction": direction, "sounding": sounding,
            "pitch": pitch, "m_y": int(start[0]), "m_x": int(start[1]), "s_y": int(sy), "s_x": int(sx),
            **_rgb_facts("m_", m_rgb), **_rgb_facts("s_", s_rgb), "m_frames": _bits(m_on)}


def _sample_pretrain(rng: np.random.Generator) -> dict[str, int]:
    shape, direction, pitch = (int(rng.integers(n)) for n in (len(SHAPES), len(DIRECTIONS), len(PITCHES)))
    start = _start(rng.choice(MEAN_RANGE, 2), direction)
    on = _visible(rng, int(rng.integers(FRAMES // 2, FRAMES + 1)))
    return {"shape": shape, "direction": direction, "pitch": pitch, "y": int(start[0]), "x": int(start[1]),
            **_rgb_facts("", _colour(rng)), "frames": _bits(on)}


def paint(kind: str, labels: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 ``(8, 32, 32, 3)`` and audio float32 ``(16000,)`` of the clip ``labels`` describe."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    if kind == "pretrain":
        on = frame_mask(labels["frames"])
        path = trajectory(labels["y"], labels["x"], labels["direction"])
        _draw(frames, labels["shape"], _rgb(labels, ""), path, on)
        return frames, tone(PITCHES[labels["pitch"]], on)
    m_on = frame_mask(labels["m_frames"])
    path = trajectory(labels["m_y"], labels["m_x"], labels["direction"])
    still = np.broadcast_to([labels["s_y"], labels["s_x"]], path.shape)
    _draw(frames, labels["moving_shape"], _rgb(labels, "m_"), path, m_on)
    _draw(frames, labels["still_shape"], _rgb(labels, "s_"), still, ~m_on)
    return frames, tone(PITCHES[labels["pitch"]], m_on if labels["sounding"] == 0 else ~m_on)


def trajectory(y: int, x: int, direction: int) -> np.ndarray:
    """int ``(8, 2)``: top-left ``(y, x)`` per frame of a sprite starting at ``(y, x)``, moving in ``direction``."""
    return np.array([y, x]) + STEPS[direction] * np.arange(FRAMES)[:, None]


def frame_mask(bits: int) -> np.ndarray:
    """bool ``(8,)`` of a ``*frames`` bit mask (bit ``k``: visible in frame ``k``)."""
    return (int(bits) >> np.arange(FRAMES)) & 1 == 1


def _visible(rng: np.random.Generator, count: int) -> np.ndarray:
    """bool ``(8,)`` with ``count`` random frames set."""
    on = np.zeros(FRAMES, dtype=bool)
    on[rng.choice(FRAMES, count, replace=False)] = True
    return on


def _colour(rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(3,)``: uniform RGB, redrawn until its brightest channel is >= :data:`BRIGHT`."""
    while True:
        rgb = rng.integers(0, 256, 3)
        if rgb.max() >= BRIGHT:
            return rgb.astype(np.uint8)


def _start(mean: np.ndarray, direction: int) -> np.ndarray:
    """int ``(2,)``: the frame-0 top-left ``(y, x)`` of a path in ``direction`` whose time-averaged
    top-left is ``mean`` ``(2,)`` (7 px back along the motion)."""
    return mean - STEPS[direction] * (FRAMES - 1) // 2


def _draw(frames: np.ndarray, shape: int, rgb: np.ndarray, path: np.ndarray, on: np.ndarray) -> None:
    """Paint sprite ``shape`` in ``rgb`` at ``path[k]`` into ``frames`` ``(8, 32, 32, 3)`` for every ``on[k]``."""
    for k in np.flatnonzero(on):
        y, x = path[k]
        frames[k, y:y + SPRITE, x:x + SPRITE][SPRITES[shape]] = rgb


def tone(hz: float, on: np.ndarray) -> np.ndarray:
    """float32 ``(16000,)``: a sine of ``hz`` (amplitude 0.5) during the frames ``on`` (bool ``(8,)``),
    silence elsewhere; every on-interval starts and ends with a 5 ms raised-cosine ramp inside it."""
    per = SAMPLE_RATE // FPS
    gate = np.repeat(on, per).astype(np.float64)
    n = int(RAMP * SAMPLE_RATE)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
    for start, stop in np.flatnonzero(np.diff(np.r_[0, on.astype(int), 0])).reshape(-1, 2) * per:
        gate[start:start + n] = ramp
        gate[stop - n:stop] = ramp[::-1]
    t = np.arange(gate.size) / SAMPLE_RATE
    return (AMPLITUDE * gate * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _rgb_facts(prefix: str, rgb: np.ndarray) -> dict[str, int]:
    return {f"{prefix}{c}": int(v) for c, v in zip("rgb", rgb)}


def _rgb(labels: Mapping[str, int], prefix: str) -> np.ndarray:
    return np.array([labels[f"{prefix}{c}"] for c in "rgb"], dtype=np.uint8)


def _bits(on: np.ndarray) -> int:
    return int(sum(1 << int(k) for k in np.flatnonzero(on)))


# -- files -----------------------------------------------------------------------------------------

def default_root() -> Path:
    """Where generated sets are cached: ``$FUSIONKIT_DATA``, else ``~/.cache/fusionkit/datasets``."""
    return Path(os.environ.get("FUSIONKIT_DATA") or Path.home() / ".cache" / "fusionkit" / "datasets").expanduser()


def set_folder(root: str | Path, kind: str, split: str, count: int, seed: int) -> Path:
    """``root/binding-v<VERSION>/<kind>-<split>-<count>-s<seed>``."""
    return Path(root) / f"binding-v{VERSION}" / f"{kind}-{split}-{count}-s{seed}"


def write_binding(root: str | Path, kind: str, count: int, seed: int, workers: int | None = None,
                  progress: bool = True, split: str = "train") -> Path:
    """Generate a set into :func:`set_folder` (once) and return its manifest path.

    The folder holds ``clip_00000.mp4 …``, ``manifest.csv`` (``path`` and the heads of
    :data:`HEADS`), ``facts.csv`` (``path`` and every label of :func:`render_clip`), one class-name
    file per head (``motion.txt``, …) and ``meta.json``. A folder whose ``meta.json`` matches is
    returned at once, untouched. Otherwise the set is generated into a temporary sibling folder by
    ``workers`` processes (default ``min(2, cpu_count)``; 1 = in this process), with a rich progress
    bar when ``progress``, and swapped in by renames only when complete: the set's folder is never a
    partial set, and an interrupted generation removes its temporary folder and leaves nothing else.
    """
    _check(kind, split, count, seed)
    folder = set_folder(root, kind, split, count, seed)
    meta = {"version": VERSION, "kind": kind, "split": split, "count": count, "seed": seed, "frames": FRAMES,
            "size": SIZE, "fps": FPS, "sample_rate": SAMPLE_RATE}
    if _complete(folder, meta):
        return folder / MANIFEST
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tasks = [(str(tmp), kind, split, seed, i) for i in range(count)]
        rows = list(_progress(_run(tasks, workers or min(2, os.cpu_count() or 1)), count,
                              f"binding: {folder.name}", progress))
        _write_tables(tmp, kind, rows)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        _publish(tmp, folder, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / MANIFEST


def _check(kind: str, split: str, count: int, seed: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"binding: kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"binding: split must be one of {SPLITS}, got {split!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"binding: count must be a positive int, got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"binding: seed must be a non-negative int, got {seed!r}")


def _complete(folder: Path, meta: Mapping[str, Any]) -> bool:
    try:
        return json.loads((folder / META).read_text()) == meta and (folder / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def write_clip(task: tuple[str, str, str, int, int]) -> dict[str, Any]:
    """Render and write clip ``index`` of ``(folder, kind, split, seed, index)``; its facts row."""
    folder, kind, split, seed, index = task
    frames, audio, labels = render_clip(kind, clip_rng(kind, split, seed, index))
    name = f"clip_{index:05d}.mp4"
    write_video(Path(folder) / name, frames, FPS, audio[None], SAMPLE_RATE, gop=FRAMES, options=ENCODER,
                audio_options=AUDIO_ENCODER)
    return {"path": name, **labels}


def _run(tasks: Sequence[tuple], workers: int) -> Iterator[dict[str, Any]]:
    """:func:`write_clip` of every task, in order: in this process (1 worker) or a process pool."""
    if workers <= 1:
        yield from map(write_clip, tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(write_clip, tasks, chunksize=32)


def _progress(rows: Iterable, total: int, description: str, show: bool) -> Iterable:
    if not show:
        return rows
    from rich.console import Console
    from rich.progress import track

    return track(rows, total=total, description=description, console=Console(stderr=True))


def _write_tables(folder: Path, kind: str, rows: list[dict[str, Any]]) -> None:
    """facts.csv, the class-name files and manifest.csv of ``rows`` (one per clip)."""
    _write_csv(folder / FACTS, list(rows[0]), rows)
    for head, names in class_names(kind).items():
        (folder / f"{head}.txt").write_text("\n".join(names) + "\n")
    _write_csv(folder / MANIFEST, ["path", *HEADS[kind]], rows)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _publish(tmp: Path, folder: Path, meta: Mapping[str, Any]) -> None:
    """Rename the complete set ``tmp`` to ``folder``; a stale ``folder`` is renamed aside, then deleted."""
    if _complete(folder, meta):  # another process finished the same set first
        return
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# -- the registered dataset --------------------------------------------------------------------------

@DATASETS.register("binding")
class BindingDataset(ManifestDataset):
    """The generated binding benchmark (binding or pretrain clips), cached as MP4 files.

    Generated on first use by :func:`write_binding`, then read as a
    :class:`~fusionkit.data.dataset.ManifestDataset` of its manifest.

    Args:
        kind, split, count, seed: the set (``count`` default: 16000 for train, 2000 for val / test).
        root: cache folder (default :func:`default_root`).
        workers, progress: generation processes and progress bar (first use only).
        heads: head → column (default: every head of the kind); class names come from the set's files.
        train: training mode (default: ``split == "train"``); with the defaults (8 of 8 frames,
            no crop, no flip) it changes nothing. ``flip`` must stay off: it swaps left and right.
        modalities, views, audio, mean, std, random_resized_crop, flip, frames, size, sampling,
        stride, decoded_cache_gb: as in :class:`~fusionkit.data.dataset.ManifestDataset` (the decoded
        clips are kept in memory by default: 16,000 clips with audio take about 1.4 GB).
        decoded_cache_dir: where decoded clips are also kept on disk, shared by processes (default
        ``True``: the set's ``decoded/`` folder, about 90 kB per clip; ``None``: off). The
        default normalisation (mean 0, std 0.5) keeps the black background at 0.
    """

    def __init__(self, kind: str = "binding", split: str = "train", count: int | None = None, seed: int = 0,
                 root: str | Path | None = None, modalities: Sequence[str] = ("video", "audio"),
                 train: bool | None = None, views: Mapping[str, int] | None = None,
                 audio: Mapping[str, Any] | None = None, mean: str | Sequence[float] = (0.0, 0.0, 0.0),
                 std: str | Sequence[float] | None = (0.5, 0.5, 0.5),
                 random_resized_crop: Mapping | Sequence | bool | None = False, flip: bool = False,
                 heads: Mapping[str, str] | None = None, frames: int = FRAMES, size: int = SIZE,
                 sampling: str = "dense", stride: int = 1, workers: int | None = None, progress: bool = True,
                 decoded_cache_gb: float = 4.0, decoded_cache_dir: str | Path | bool | None = True) -> None:
        count = DEFAULT_COUNTS.get(split) if count is None else count
        manifest = write_binding(default_root() if root is None else root, kind, count, seed, workers, progress,
                                 split=split)
        heads = dict(heads) if heads is not None else {h: h for h in HEADS[kind]}
        classes = {h: f"{column}.txt" for h, column in heads.items() if column in HEADS[kind]}
        train = split == "train" if train is None else train
        super().__init__(manifest, heads=heads, classes=classes, modalities=modalities, frames=frames,
                         sampling=sampling, stride=stride, size=size, train=train, views=views, audio=audio,
                         mean=mean, std=std, random_resized_crop=random_resized_crop, flip=flip,
                         decoded_cache_gb=decoded_cache_gb,
                         decoded_cache_dir=manifest.parent / "decoded" if decoded_cache_dir is True
                         else decoded_cache_dir or None)

    @property
    def reads_fixed(self) -> bool:
        """Every draw reads the whole clip (all frames, dense, stride 1) and its audio span."""
        return (self.frames == FRAMES and self.sampling == "dense" and self.stride == 1
                and self.audio["seconds"] is None)
