"""``ManifestDataset``: clips of real media files listed in a manifest, registered as ``manifest``.

One item = one manifest row (training) or one test view (evaluation: ``clips × crops`` views per
row, all sharing the row's ``clip_id``, so :class:`~fusionkit.metrics.MetricTracker` averages them).

Per item:

1. **frames**: the row's span ``[start, end)`` covers frames ``ceil(start·fps) … ceil(end·fps) - 1``;
   ``frames`` of them are sampled (``dense`` with ``stride``, or one per ``segment``; random in
   training, at the view's clip position in evaluation, see :mod:`fusionkit.data.sampling`) and
   decoded with PyAV after seeking to the first one.
2. **video**: train: random resized crop → flip → colour jitter → RandAugment (one draw per clip);
   test: short side to ``short_side`` (default ``size``) → the view's square crop; then normalised
   (``mean``/``std``, ImageNet's by default) to float32 ``(3, T, size, size)``.
3. **audio**: from the same container, or the row's ``audio_path`` (time 0 = the video's time 0),
   mono (channel mean), resampled to ``audio.sample_rate``, cut to exactly the sampled frames' time
   span ``[first / fps, (last + 1) / fps)``; with ``audio.seconds`` a window of that length centred
   on the span instead (zeros where the file has no audio). Without video (``modalities:
   [audio]``) the window lies in the row's span: random in training, at the clip position in
   evaluation; the whole span without ``seconds``. ``audio.frontend`` (a ``FRONTENDS`` entry, e.g.
   ``{type: kaldi_fbank, target_length: 1024}``) turns the waveform into features here; by default
   the model's expert runs its front-end on the batch.
4. **motion** (optional): the H.264 / MPEG-4 motion vectors of the same frames, rasterised to
   float32 ``(2, T, size, size)`` (``dx, dy`` in output pixels, see :mod:`fusionkit.data.motion`)
   and cropped / resized / flipped with the video's draw; no colour ops, no normalisation.
5. **iframe** (optional): for each sampled frame, the keyframe that starts its GOP
   (:func:`~fusionkit.data.compressed.keyframes`), decoded with the video's frames and transformed
   and normalised exactly as they are (one draw for both) to float32 ``(3, T, size, size)``.
6. **residual** (optional): each sampled frame minus its motion-compensated prediction from the
   previous frame (:mod:`fusionkit.data.compressed`), float32 ``(3, T, size, size)`` in the video's
   units (``/ 255 / std``, no mean), cropped / resized / flipped with the video's draw, no colour ops.
7. **plugin modalities** (optional): a modality registered by a plugin as a
   :class:`~fusionkit.data.producers.FrameStream` (e.g. ``flow``, ``examples/fusionkit-flow``) is
   computed by its producer from the same sampled frames, then cropped / resized / flipped with the
   video's draw (displacement fields also rescaled and mirrored, as the motion vectors).
8. A file that cannot be decoded gives :class:`~fusionkit.data.collate.Skipped` (path, reason),
   logged as a warning; :func:`~fusionkit.data.collate.collate` drops it and lists it.

Randomness: each item draws everything from one item seed. With ``seed=None`` that seed comes from
``torch``'s RNG (seeded per worker by the DataLoader, see :mod:`fusionkit.data.loader`); with an
integer ``seed`` it is derived from ``(seed, epoch, index)`` only, reproducible for any worker count
(call :meth:`ManifestDataset.set_epoch` every epoch to vary the augmentation).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionkit.data import compressed, decode, memo, motion, producers, sampling
from fusionkit.data.collate import Skipped
from fusionkit.data.corrupt import Corruption
from fusionkit.data.manifest import Manifest
from fusionkit.data.transforms import TrainTransform, norm_constants, normalize, to_video, view_crop
from fusionkit.registry import DATASETS
from fusionkit.registry import MODALITIES as MODALITY_REGISTRY

log = logging.getLogger(__name__)

MODALITIES = producers.BUILTIN  # decoded here; plugins add producers (fusionkit.data.producers)
VISUAL = ("video", "iframe", "motion", "residual")  # modalities read from the sampled frames
MISSING = ("silence", "error", "skip")
AUDIO_KEYS = ("sample_rate", "seconds", "missing", "frontend")
VIEW_KEYS = ("clips", "crops")


class MissingAudioError(RuntimeError):
    """A media file without an audio track while ``audio.missing`` is ``error``."""


def _options(given: Mapping[str, Any] | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"ManifestDataset: unknown {what} option(s) {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **given}


@DATASETS.register("manifest")
class ManifestDataset(Dataset):
    """Video / audio clips of the media files listed in a CSV or JSONL manifest.

    Args:
        path: manifest file (see :mod:`fusionkit.data.manifest` for its columns).
        root: folder relative media paths start from (default: the manifest's folder).
        heads: head → label column (default: every column but path / start / end / id / audio_path).
        classes: head → class-name file (one name per line; relative to the manifest's folder).
        modalities: any of ``video``, ``audio``, ``motion`` (motion vectors of the video's frames),
            ``iframe`` (the keyframes of their GOPs), ``residual`` (motion-compensated residuals), or a
            modality a plugin registers (:mod:`fusionkit.data.producers`).
        frames: frames per clip; sampling: ``dense`` or ``segment``; stride: frame step (dense).
        size: output side of the square crops; short_side: test-time resize (default ``size``).
        train: training mode (random sampling and augmentation, one view per row).
        views: ``{clips, crops}`` test views per row (ignored in training).
        audio: ``{sample_rate: 16000, seconds: None, missing: silence | error | skip, frontend: None}``.
        mean, std: normalisation: ``"imagenet"`` (default) / ``"clip"``, or three-value lists.
        random_resized_crop: ``{scale, ratio}`` (or a ``[min, max]`` scale), default scale (0.08, 1);
            ``False``: short-side resize and a random crop instead.
        flip, color_jitter, randaugment (``{n, m}``): train augmentation, see
            :class:`~fusionkit.data.transforms.TrainTransform`.
        seed: ``None`` (randomness from the worker's torch RNG) or an int (per-item seeds from
            ``(seed, epoch, index)``).
        decoded_cache_gb: keep up to this many GB of decoded frames / audio in memory and decode
            each (file, frames) once per process (:mod:`fusionkit.data.memo`; 0: off).
        decoded_cache_dir: also keep every decoded (file, frames) / audio window in this folder, shared
            by processes and later runs (:mod:`fusionkit.data.memo`; ``None``: off).
    """

    corruption: Corruption | None = None  # set by `fusionkit eval --corrupt` (fusionkit.data.corrupt)

    def __init__(self, path: str | Path, root: str | Path | None = None, heads: Mapping[str, str] | None = None,
                 classes: Mapping[str, str] | None = None, modalities: Sequence[str] = ("video",),
                 frames: int = 16, sampling: str = "dense", stride: int = 4, size: int = 224,
                 short_side: int | None = None, train: bool = False, views: Mapping[str, int] | None = None,
                 audio: Mapping[str, Any] | None = None, mean: str | Sequence[float] = "imagenet",
                 std: str | Sequence[float] | None = None, random_resized_crop: Mapping | Sequence | bool | None = None,
                 flip: bool = True, color_jitter: float | Sequence[float] | None = None,
                 randaugment: Mapping[str, int] | None = None, seed: int | None = None,
                 decoded_cache_gb: float = 0.0, decoded_cache_dir: str | Path | None = None) -> None:
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        if not modalities:
            raise ValueError(f"ManifestDataset: modalities must name at least one of {MODALITIES} (or a plugin's "
                             "modality), got none")
        self.streams = _streams(modalities)  # plugin modalities computed from the sampled frames
        if sampling not in sampling_schemes():
            raise ValueError(f"ManifestDataset: sampling must be one of {sampling_schemes()}, got {sampling!r}")
        if frames < 1 or stride < 1 or size < 1:
            raise ValueError(f"ManifestDataset: frames, stride and size must be >= 1, got {frames}, {stride}, {size}")
        self.manifest = Manifest(path, root=root, heads=heads, classes=classes)
        self.modalities = modalities
        self.frames, self.sampling, self.stride, self.size = int(frames), sampling, int(stride), int(size)
        self.short_side = int(short_side) if short_side else self.size
        if self.short_side < self.size:
            raise ValueError(f"ManifestDataset: short_side ({self.short_side}) must be >= size ({self.size})")
        self.train = bool(train)
        v = _options(views, {"clips": 1, "crops": 1}, "views")
        self.clips, self.crops = (1, 1) if self.train else (int(v["clips"]), int(v["crops"]))
        if self.clips < 1 or self.crops < 1:
            raise ValueError(f"ManifestDataset: views need clips >= 1 and crops >= 1, got {v}")
        self.audio = _options(audio, {"sample_rate": 16000, "seconds": None, "missing": "silence", "frontend": None},
                              "audio")
        if self.audio["missing"] not in MISSING:
            raise ValueError(f"ManifestDataset: audio.missing must be one of {MISSING}, got {self.audio['missing']!r}")
        if int(self.audio["sample_rate"]) <= 0:
            raise ValueError(f"ManifestDataset: audio.sample_rate must be > 0, got {self.audio['sample_rate']}")
        if self.audio["seconds"] is not None and float(self.audio["seconds"]) <= 0:
            raise ValueError(f"ManifestDataset: audio.seconds must be > 0 or None, got {self.audio['seconds']}")
        self.frontend = None
        if self.audio["frontend"]:
            from fusionkit.registry import FRONTENDS

            spec = dict(self.audio["frontend"])
            kind = spec.pop("type", "kaldi_fbank")
            spec.setdefault("sample_rate", int(self.audio["sample_rate"]))
            self.frontend = FRONTENDS.build(kind, **spec)
        self.mean, self.std = norm_constants(mean, std)
        rrc: dict[str, Any] = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}
        if random_resized_crop is False:
            rrc["scale"] = None
        elif isinstance(random_resized_crop, Mapping):
            rrc = _options(random_resized_crop, rrc, "random_resized_crop")
        elif random_resized_crop not in (None, True):
            rrc["scale"] = tuple(random_resized_crop)
        self.augment = TrainTransform(self.size, scale=rrc["scale"], ratio=rrc["ratio"], flip=flip,
                                      color_jitter=color_jitter, randaugment=dict(randaugment) if randaugment else None)
        self.seed = seed
        self.epoch = 0
        self.decoded_cache_gb = float(decoded_cache_gb)
        self.decoded_cache_dir = Path(decoded_cache_dir).expanduser() if decoded_cache_dir else None

    # -- the contract's small API ---------------------------------------------------------------

    @property
    def heads(self) -> dict[str, str]:
        """Head → label column."""
        return dict(self.manifest.heads)

    @property
    def views_per_item(self) -> int:
        return self.clips * self.crops

    def class_names(self, head: str) -> list[str]:
        """Class names of ``head`` (from its class-name file, or inferred from the labels)."""
        if head not in self.manifest.names:
            raise KeyError(f"unknown head {head!r}; heads: {sorted(self.manifest.names)}")
        return list(self.manifest.names[head])

    def num_classes(self, head: str) -> int:
        return len(self.class_names(head))

    def set_epoch(self, epoch: int) -> None:
        """Vary the per-item seeds of a seeded dataset from epoch to epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.manifest) * self.views_per_item

    @property
    def reads_fixed(self) -> bool:
        """Whether every draw of an item reads the same frames and audio window (then decoding the
        set once into ``decoded_cache_dir`` serves every later epoch, see :meth:`decode_all`). False
        here; datasets whose sampling covers each clip whole say so."""
        return False

    def decode_all(self, shard: int = 0, shards: int = 1) -> int:
        """Load items ``shard, shard + shards, …`` once so that their decoded media land in the
        decoded-media memory / folder; returns how many were read."""
        indices = range(shard, len(self), shards)
        for index in indices:
            self[index]
        return len(indices)

    def __repr__(self) -> str:
        return (f"ManifestDataset({self.manifest.path}, {len(self.manifest)} items, {self.views_per_item} views, "
                f"modalities={self.modalities}, frames={self.frames}, sampling={self.sampling}, train={self.train})")

    # -- items ----------------------------------------------------------------------------------

    def item_seed(self, index: int) -> int:
        if self.seed is None:
            return int(torch.randint(0, 2**62, (1,)).item())
        return int(np.random.SeedSequence([int(self.seed), self.epoch, int(index)]).generate_state(2, np.uint64)[0]
                   % 2**62)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} views")
        row, view = divmod(int(index), self.views_per_item)
        clip, crop = divmod(view, self.crops)
        item = self.manifest.items[row]
        try:
            return self._load(item, clip, crop, self.item_seed(index))
        except decode.DecodeError as err:
            log.warning("skipping %s: %s", item.path, err)
            return Skipped(item.path, str(err), item.clip_id)

    def _load(self, item, clip: int, crop: int, seed: int) -> dict[str, Any]:
        rng = random.Random(seed)
        source = self._source(item.path)
        info = self._memo(("probe", source), lambda: decode.probe(item.path))
        out: dict[str, Any] = {}
        start = item.start or 0.0
        window = None  # (t0, t1) seconds the clip covers, relative to the media's origin
        if set(VISUAL) & set(self.modalities) or self.streams:
            if not info.has_video:
                raise decode.DecodeError(f"{item.path} has no video stream")
            fps = info.fps
            first = int(math.ceil(start * fps - 1e-6))
            stop = info.num_frames if item.end is None else min(info.num_frames, int(math.ceil(item.end * fps - 1e-6)))
            if stop <= first:
                raise decode.DecodeError(f"{item.path}: span [{start}, {item.end}) holds no frame "
                                         f"({info.num_frames} frames at {fps:g} fps)")
            position = None if self.train else sampling.clip_positions(self.sampling, self.clips)[clip]
            idx = sampling.sample_indices(self.sampling, stop - first, self.frames, self.stride, position, rng)
            numbers = [first + i for i in idx]
            frames = self._pictures(item.path, source, numbers, info)  # uint8 (T, 3, H, W): video, iframe
            fields, vectors = self._fields(item.path, source, numbers, info)
            if vectors:
                frames, fields, moved = self._spatial_vectors(frames, fields, vectors, rng, crop)
                out.update(moved)
            else:
                frames, fields = self._spatial(frames, fields, rng, crop)
            if "video" in frames:
                video = frames["video"]
                if self.corruption is not None:  # fusionkit eval --corrupt: the uint8 view, after the memo
                    video = self.corruption.video(video, (item.clip_id, clip))
                out["video"] = normalize(video, self.mean, self.std)
            if "iframe" in frames:
                out["iframe"] = normalize(frames["iframe"], self.mean, self.std)
            if "residual" in fields:
                out["residual"] = compressed.normalize_residual(fields["residual"], self.std)
            for name, stream in self.streams.items():  # plugin fields: (C, T, h, w) after the one draw
                field = out.pop(name) if name in out else fields[name].transpose(0, 1)
                out[name] = stream.finish(field.contiguous())
            out["frame_index"] = torch.tensor(numbers, dtype=torch.long)
            window = (min(numbers) / fps, (max(numbers) + 1) / fps)
        missing = False
        if "audio" in self.modalities:
            out["audio"], missing, audio_window = self._audio(item, info, window, clip, rng)
            window = window or audio_window
        out["labels"] = {h: torch.tensor(v, dtype=torch.long) for h, v in item.labels.items()}
        out["span"] = torch.tensor(window, dtype=torch.float64)
        out["clip_id"] = item.clip_id
        out["path"] = item.path
        out["audio_missing"] = bool(missing)
        out["modalities"] = tuple(self.modalities)  # the batch declares its streams (fusionkit.data.collate)
        return out

    def _pictures(self, path: str, source: tuple | None, numbers: list[int],
                  info: decode.MediaInfo) -> dict[str, torch.Tensor]:
        """uint8 ``(T, 3, H, W)`` ``video`` (the sampled frames) and ``iframe`` (the keyframes of their
        GOPs, :func:`~fusionkit.data.compressed.keyframes`) as one decode: the same code path."""
        wanted = {"video": numbers} if "video" in self.modalities else {}
        if "iframe" in self.modalities:
            wanted["iframe"] = self._memo(("keyframes", source, tuple(numbers)),
                                          lambda: compressed.keyframes(path, numbers, info))
        if not wanted:
            return {}
        every = [n for group in wanted.values() for n in group]
        frames = to_video(self._memo(("frames", source, tuple(every)), lambda: decode.read_frames(path, every, info)))
        return dict(zip(wanted, frames.split(len(numbers))))

    def _fields(self, path: str, source: tuple | None, numbers: list[int],
                info: decode.MediaInfo) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The float fields of the sampled frames at the file's resolution: ``fields`` ``{name: (T, C, H, W)}``
        (residuals, plugin maps: the video's crop / resize / flip only) and ``vectors`` ``{name: (2, T, H, W)}``
        (motion vectors, plugin displacement fields: also rescaled and mirrored, :func:`motion.geometric`)."""
        fields: dict[str, torch.Tensor] = {}
        vectors: dict[str, torch.Tensor] = {}
        if "residual" in self.modalities:
            residual = compressed.decode_residual(path, numbers, info)  # (3, T, H, W)
            fields["residual"] = torch.from_numpy(residual).transpose(0, 1)
        if "motion" in self.modalities:
            vectors["motion"] = torch.from_numpy(motion.decode_motion(path, numbers, info))
        for name, stream in self.streams.items():
            field = self._memo((f"stream:{name}", source, tuple(numbers)),
                               lambda stream=stream: stream.decode(path, numbers, info))
            field = torch.from_numpy(stream.checked(name, field, numbers, info))  # (C, T, H, W)
            if stream.vectors:
                vectors[name] = field
            else:
                fields[name] = field.transpose(0, 1)
        return fields, vectors

    def _spatial_vectors(self, frames: dict[str, torch.Tensor], fields: dict[str, torch.Tensor],
                         vectors: dict[str, torch.Tensor], rng: random.Random, crop: int,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`_spatial` with displacement fields ``vectors`` ``{name: (2, T, H, W)}`` in the same draw: they
        travel with one coordinate frame (:func:`motion.geometric`), so they are rescaled into output pixels
        and mirrored with the video. Returns frames, fields and ``{name: (2, T, size, size)}``."""
        moved: dict[str, dict[str, torch.Tensor]] = {}

        def joint(f: torch.Tensor) -> torch.Tensor:  # the fields' coordinate frame joins the one draw
            moved["frames"], moved["fields"] = self._spatial(frames, {**fields, "motion": f}, rng, crop)
            return moved["fields"].pop("motion")

        lengths = [v.shape[1] for v in vectors.values()]
        out = motion.geometric(torch.cat(list(vectors.values()), dim=1), joint)  # (2, ΣT, size, size)
        return moved["frames"], moved["fields"], dict(zip(vectors, out.split(lengths, dim=1)))

    def _spatial(self, frames: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], rng: random.Random,
                 crop: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One draw for the whole clip: ``frames`` (uint8 ``(T, 3, H, W)``) take the video's transform
        (train augmentation or the test view), ``fields`` (float ``(T', C, H, W)``) its crop / resize /
        flip only; returned with the same keys, at ``size × size``."""
        h, w = next(iter({**frames, **fields}.values())).shape[-2:]
        rgb = torch.cat(list(frames.values())) if frames else torch.zeros(1, 3, h, w, dtype=torch.uint8)  # stand-in
        flat = torch.cat([f.reshape(1, -1, h, w) for f in fields.values()], 1) if fields else None
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.randrange(2**62))
                if flat is None:
                    rgb = self.augment(rgb)
                else:
                    rgb, flat = self.augment.paired(rgb, flat)
        else:
            crop_at = sampling.crop_positions(self.crops)[crop]
            rgb = view_crop(rgb, self.size, crop_at, self.short_side)
            flat = None if flat is None else view_crop(flat, self.size, crop_at, self.short_side)
        out_frames = dict(zip(frames, rgb.split([f.shape[0] for f in frames.values()]) if frames else ()))
        parts = flat.split([f.shape[0] * f.shape[1] for f in fields.values()], 1) if fields else []
        out_fields = {k: p.reshape(f.shape[0], f.shape[1], *p.shape[-2:]) for (k, f), p in zip(fields.items(), parts)}
        return out_frames, out_fields

    def _source(self, path: str | Path) -> tuple | None:
        """The memo key of a media file, ``None`` when nothing decoded is remembered."""
        return memo.file_key(path) if self.decoded_cache_gb > 0 or self.decoded_cache_dir else None

    def _memo(self, key: tuple, compute: Any) -> Any:
        """``compute()``, remembered in the process's decoded-media memory / folder when they are on."""
        if key[1] is None:
            return compute()
        value = memo.decoded(key, compute, self.decoded_cache_gb, self.decoded_cache_dir)
        if isinstance(value, (torch.Tensor, np.ndarray)):  # callers may change their arrays in place
            return value.clone() if isinstance(value, torch.Tensor) else value.copy()
        return value

    def _audio(self, item, info: decode.MediaInfo, window: tuple[float, float] | None, clip: int,
               rng: random.Random) -> tuple[torch.Tensor, bool, tuple[float, float]]:
        """Mono audio at ``audio.sample_rate``, whether the track was missing, and its window (s)."""
        rate = int(self.audio["sample_rate"])
        seconds = None if self.audio["seconds"] is None else float(self.audio["seconds"])
        if window is not None:
            t0, t1 = window
            if seconds is not None:
                centre = (t0 + t1) / 2
                t0, t1 = centre - seconds / 2, centre + seconds / 2
        else:  # audio alone: a window inside the row's span
            lo = item.start or 0.0
            hi = item.end if item.end is not None else info.duration
            if item.audio_path is not None and item.end is None:
                hi = decode.probe(item.audio_path).duration
            if seconds is None:
                t0, t1 = lo, hi
            else:
                slack = max(hi - lo - seconds, 0.0)
                pos = rng.random() if self.train else sampling.clip_positions("dense", self.clips)[clip]
                t0 = lo + slack * pos
                t1 = t0 + seconds
        if self.corruption is not None:  # audio_shift: the shifted window is read from the file
            shift = self.corruption.audio_shift((item.clip_id, clip))
            t0, t1 = t0 + shift, t1 + shift
        path, origin = (item.audio_path, 0.0) if item.audio_path is not None else (item.path, info.origin)
        source = self._source(path)
        wave = self._memo(("audio", source, t0, t1, rate, origin),
                          lambda: decode.read_audio(path, t0, t1, rate, origin=origin))
        missing = wave is None
        if missing:
            policy = self.audio["missing"]
            source = item.audio_path or item.path
            if policy == "error":
                raise MissingAudioError(f"{source} has no audio track (set audio.missing to 'silence' or 'skip' "
                                        "to continue without it)")
            if policy == "skip":
                raise decode.DecodeError(f"{source} has no audio track (audio.missing: skip)")
            wave = torch.zeros(int(round((t1 - t0) * rate)), dtype=torch.float32)
        if self.corruption is not None:
            wave = self.corruption.audio(wave, rate, (item.clip_id, clip))
        if self.frontend is not None:
            with torch.no_grad():
                wave = self.frontend(wave[None], rate)[0]
        return wave, missing, (t0, t1)


def _streams(modalities: Sequence[str]) -> dict[str, producers.FrameStream]:
    """The producers of the plugin modalities of ``modalities``; a :class:`~fusionkit.data.producers.ModalityError`
    naming the registered modalities for one without a producer."""
    unknown = [m for m in modalities if m not in MODALITIES and m not in MODALITY_REGISTRY]
    if unknown:
        plugins = [m for m in MODALITY_REGISTRY.names() if m not in MODALITIES]
        raise producers.ModalityError(
            f"ManifestDataset: modalities: no data producer for {unknown[0]!r}; built in: {', '.join(MODALITIES)}; "
            f"from plugins: {', '.join(plugins) or 'none'} (a plugin registers one with fusionkit.registry.MODALITIES, "
            "docs/plugins.md)")
    return producers.frame_streams(modalities)


def sampling_schemes() -> tuple[str, ...]:
    return sampling.SCHEMES
