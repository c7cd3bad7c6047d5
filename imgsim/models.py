"""The model catalogue, where model files are found, and running them through onnxruntime.

A model is an ONNX file with one float32 input ``input`` of shape (N, 3, H, W) and an output
``embedding`` of shape (N, dim): pooled features before any classifier. `Embedder.embed`
L2-normalises them, so inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import checked
from .errors import ModelError
from .files import file_sha256
from .images import Preprocess

MODELS_ENV = "IMGSIM_MODELS"
"""Environment variable naming an extra folder of model files."""
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
"""Set to 1 (unless already set) before onnxruntime is imported: see `onnxruntime_module`."""

# Whole-image resizing after trimming plain borders, and GeM pooling (p=3), were chosen by
# scripts/eval_retrieval.py over centre crop and average pooling: see "How good is it" in README.md.
# Keeping vectors of each indexed picture's centre too (`imgsim index --centre-view`, crops.py) is an
# option, not the default: it finds tight crops, but embeds every picture 3 times and more than
# doubles the bytes an image takes on disk.
# EfficientNet-Lite was trained in TensorFlow on inputs scaled as (x - 127) / 128; models/README.md
# has the evidence (BatchNorm statistics and ImageNet classification of real photos).
_LITE_PREPROCESS = Preprocess(
    size=224, resize_to=224, resize="squash", interpolation="bilinear",
    mean=(127.0 / 255, 127.0 / 255, 127.0 / 255), std=(128.0 / 255, 128.0 / 255, 128.0 / 255), trim=True,
)
_TORCHVISION_PREPROCESS = Preprocess(
    size=224, resize_to=224, resize="squash", interpolation="bilinear",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), trim=True,
)
DEFAULT_POOLING = "gem3"


@dataclass(frozen=True)
class ModelSpec:
    """A catalogue entry. `sha256` is set where the file is a fixed, published artefact."""

    name: str
    filename: str
    dim: int
    preprocess: Preprocess
    description: str
    sha256: str | None = None
    how_to_get: str = ""
    pooling: str = DEFAULT_POOLING


_QUANTIZE = "run scripts/quantize.py models/{src} --calibrate PHOTO_FOLDER -o models/{dst}"

CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="efficientnet-lite0",
            filename="efficientnet-lite0.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="EfficientNet-Lite0, ImageNet weights, fp32 (bundled)",
            sha256="b4e688f1897f4e4c828a200f4bda4f1383246818f726ed94248a7777ecf3bbc6",
            how_to_get="it ships with imgsim: reinstall imgsim, or run scripts/convert_efficientnet_lite.py",
        ),
        ModelSpec(
            name="efficientnet-lite0-int8",
            filename="efficientnet-lite0.int8.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="EfficientNet-Lite0, static INT8 (QDQ, per-channel), 2x faster (bundled)",
            sha256="e63db1b1fdbfe7c2cd5faee81f7e0d217712a680ab8e98a502ef657910c65acb",
            how_to_get="it ships with imgsim: reinstall imgsim, or see models/README.md",
        ),
        ModelSpec(
            name="efficientnet-lite0-lw",
            filename="efficientnet-lite0-lw.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="EfficientNet-Lite0 + learned whitening (blur, crops, grey, turns), fp32 (bundled)",
            sha256="acb729f3071f47a83dfccd228a69f1ee1a598586ac344c49130b428bbbddefc0",
            how_to_get="it ships with imgsim: reinstall imgsim (scripts/learn_whitening.py rebuilds it byte for byte "
                       "with the versions in models/README.md)",
            pooling="avg",
        ),
        ModelSpec(
            name="efficientnet-lite0-lw-int8",
            filename="efficientnet-lite0-lw.int8.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="efficientnet-lite0-lw's head on the INT8 Lite0: the fast choice (bundled)",
            sha256="1c499b6a67a37a7bf4358103f807d4c0adb68195084340aa36f802a9f940603d",
            how_to_get="it ships with imgsim: reinstall imgsim (scripts/learn_whitening.py --head-from rebuilds it; "
                       "models/README.md)",
            pooling="avg",
        ),
        ModelSpec(
            name="efficientnet-lite1",
            filename="efficientnet-lite1.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="EfficientNet-Lite1, ImageNet weights, fp32",
            sha256="07794393b507d5f15d81dee448e14e09aec2e3f57819b6623eb7b60ab113a228",
            how_to_get="run scripts/convert_efficientnet_lite.py --variant lite1 (see models/README.md)",
        ),
        ModelSpec(
            name="efficientnet-lite2",
            filename="efficientnet-lite2.onnx",
            dim=1280,
            preprocess=_LITE_PREPROCESS,
            description="EfficientNet-Lite2, ImageNet weights, fp32",
            sha256="39d4180179c28d69c7cd2e55cbea93d53a1e5a17c414037e7906c0549ab91bd8",
            how_to_get="run scripts/convert_efficientnet_lite.py --variant lite2 (see models/README.md)",
        ),
        ModelSpec(
            name="resnet50",
            filename="resnet50.onnx",
            dim=2048,
            preprocess=_TORCHVISION_PREPROCESS,
            description="ResNet50, torchvision ImageNet weights, fp32 (exported by you)",
            how_to_get="run scripts/export_resnet50.py WEIGHTS -o models/resnet50.onnx, "
                       "or `imgsim models add resnet50 FILE`",
        ),
        ModelSpec(
            name="resnet50-int8",
            filename="resnet50.int8.onnx",
            dim=2048,
            preprocess=_TORCHVISION_PREPROCESS,
            description="ResNet50, static INT8 (QDQ, per-channel)",
            how_to_get=_QUANTIZE.format(src="resnet50.onnx", dst="resnet50.int8.onnx"),
        ),
    )
}

BUNDLED_MODEL = "efficientnet-lite0-lw"
"""The default model while resnet50.onnx is not installed: Lite0 with learned whitening (README, "How good is it")."""


def user_dir() -> Path:
    """Where `imgsim models add` installs files: $IMGSIM_MODELS, else the user's data folder."""
    extra = os.environ.get(MODELS_ENV)
    if extra:
        return Path(extra)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "imgsim" / "models"


def search_dirs() -> list[Path]:
    """Where model files are looked for, in order: the source tree's models/, the copy bundled in
    the installed package, then `user_dir()`."""
    here = Path(__file__).resolve().parent
    return [here.parent / "models", here / "_models", user_dir()]


def spec_for(name: str) -> ModelSpec:
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(sorted(CATALOGUE))
        raise ModelError(f"unknown model {name!r}: known models are {known}") from None


def find_file(spec: ModelSpec) -> Path | None:
    for directory in search_dirs():
        candidate = directory / spec.filename
        if candidate.is_file():
            return candidate
    return None


def default_model() -> tuple[str, str]:
    """The model a new index gets when none is named, and why."""
    if find_file(CATALOGUE["resnet50"]) is not None:
        return "resnet50", "its ONNX file is installed"
    return BUNDLED_MODEL, ("bundled; Lite0 with learned whitening: finds more blurred, cropped and turned copies "
                           "than plain Lite0, as fast; resnet50 becomes the default once its ONNX file is "
                           "installed")


@dataclass
class Model:
    """A catalogue entry together with its installed, verified file, and how it is run: the
    preprocessing and pooling of the catalogue, or those an existing index was made with."""

    spec: ModelSpec
    path: Path
    sha256: str
    preprocess: Preprocess | None = None
    pooling: str | None = None

    def __post_init__(self):
        self.preprocess = self.preprocess or self.spec.preprocess
        self.pooling = self.pooling or self.spec.pooling
        self._gem_p = parse_pooling(self.pooling)

    @classmethod
    def load(cls, name: str, expect_sha256: str | None = None, preprocess: Preprocess | None = None,
             pooling: str | None = None) -> Model:
        """Find and verify a model file. `expect_sha256`, `preprocess` and `pooling` are what an
        existing index was made with."""
        spec = spec_for(name)
        path = find_file(spec)
        if path is None:
            dirs = ", ".join(str(d) for d in search_dirs())
            raise ModelError(f"model {name} is not installed (looked in {dirs}): {spec.how_to_get}")
        digest = checked.file_sha256(path, "model")  # read once per version of the file (checked.py)
        if spec.sha256 and digest != spec.sha256:
            raise ModelError(f"model file {path} is damaged (sha256 {digest[:12]}..., expected "
                             f"{spec.sha256[:12]}...): {spec.how_to_get}")
        if expect_sha256 and digest != expect_sha256:
            raise ModelError(f"the index was made with a different {name} file (sha256 {expect_sha256[:12]}...) "
                             f"than {path} (sha256 {digest[:12]}...): install the same file, or rebuild the index")
        return cls(spec, path, digest, preprocess, pooling)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def input_side(self, wanted: int) -> int:
        """`wanted` where the model's graph takes inputs of any size (every catalogue model), else
        the side it is fixed at (`images.soft_views` asks for a smaller input)."""
        fixed = [d for d in self._session.get_inputs()[0].shape[2:] if isinstance(d, int)]
        return fixed[0] if fixed else wanted

    @cached_property
    def _session(self):
        ort = onnxruntime_module()

        def options(optimise: bool, save_to: Path | None = None):
            options = ort.SessionOptions()
            level = ort.GraphOptimizationLevel
            options.graph_optimization_level = level.ORT_ENABLE_ALL if optimise else level.ORT_DISABLE_ALL
            options.intra_op_num_threads = available_cpus()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # Spinning threads starve the decoding threads that run beside inference while indexing
            # (measured with scripts/bench_models.py: 2 spinning threads fell below 1 thread's speed).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if save_to is not None:
                options.optimized_model_filepath = str(save_to)
                # Weights in a file of their own beside the graph: loading them from there costs
                # ~10 ms of CPU where parsing them inside the graph cost ~40 (measured, same embeddings).
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 save_to.name + ".data")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
            return options

        cache = OptimisedCache(self, ort.__version__)
        if cache.usable():
            try:
                return ort.InferenceSession(str(cache.path), options(False), providers=["CPUExecutionProvider"])
            except Exception:  # whatever the cached copy holds, the model itself still loads below
                pass
        staged = cache.stage()
        try:
            session = ort.InferenceSession(str(self.path), options(True, staged), providers=["CPUExecutionProvider"])
        except Exception as e:
            if staged is None:
                raise ModelError(f"model file {self.path} could not be loaded by onnxruntime: {e}") from None
            cache.discard(staged)
            try:
                session = ort.InferenceSession(str(self.path), options(True), providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ModelError(f"model file {self.path} could not be loaded by onnxruntime: {e}") from None
        else:
            cache.publish(staged)
        return session

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Embed a (N, 3, H, W) float32 batch into (N, dim) L2-normalised float32 vectors."""
        feed = {"input": np.ascontiguousarray(batch, dtype=np.float32)}
        if self._gem_p is None:
            (out,) = self._session.run(["embedding"], feed)
        else:
            (feature_map,) = self._session.run(["feature_map"], feed)
            levels, centre = pooling_regions(self.pooling)
            if levels or centre:
                h, w = feature_map.shape[2:]
                out = sum(normalize(gem(feature_map[:, :, t:t + rh, lf:lf + rw], self._gem_p))
                          for t, lf, rh, rw in regions(h, w, levels, centre))
            else:
                out = gem(feature_map, self._gem_p)
        return normalize(out.reshape(len(batch), -1))

    def embed_views(self, batch: np.ndarray, crops: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Embed a (N, V, 3, H, W) batch of V views per image (see `images.to_views`), the last
        `crops` of them crop views: (N, dim) vectors of the others (each view's vector normalised,
        summed per image, normalised again) and (N, crops, dim) vectors of the crop views."""
        n, views = batch.shape[:2]
        vectors = self.embed(batch.reshape(n * views, *batch.shape[2:])).reshape(n, views, -1)
        return normalize(vectors[:, :views - crops].sum(axis=1)), vectors[:, views - crops:]


class OptimisedCache:
    """The model as onnxruntime optimises it, kept in the user's cache, so that later starts load it
    without optimising again: graph optimisation (ORT_ENABLE_ALL: fusions, constant folding, the
    NCHWc layout) and parsing the weights inside the graph took ~65 of the ~80 ms of CPU a session
    start took for the bundled model; the optimised graph, with its weights in a file beside it,
    loads with optimisation off in ~10-30 ms and runs the same graph (measured: bit-identical
    embeddings, the same inference speed; scripts/bench_cold.py for the whole start).

    The copy is only good where it was made (onnxruntime says so when it writes one), so its name
    is a digest of the model's sha256, the onnxruntime version and this CPU's feature flags (the
    NCHWc block size follows AVX2 / AVX-512; a home folder may be shared by several machines).
    Beside it, a JSON note written last records that key and the sha256 of the graph and of its
    weights; the copy is used only when all match, each sha256 read once per version of the file
    (`checked.file_sha256`). A missing, foreign, partial or altered copy is simply made again;
    nothing here can fail a search.
    """

    KIND = "optimised-model"

    def __init__(self, model: Model, ort_version: str):
        cpu = _cpu_features()
        self.key = {"model_sha256": model.sha256, "onnxruntime": ort_version, "cpu": cpu, "level": "all",
                    "external_weights": True}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = checked.cache_dir() / "optimised"
        self.path = self.folder / f"{model.name}-{digest}.onnx"
        self.data = self.path.with_name(self.path.name + ".data")  # the name the graph refers to
        self.note = self.path.with_suffix(".json")
        self.enabled = cpu is not None and os.environ.get(OPTIMISED_CACHE_ENV, "1") != "0"

    def usable(self) -> bool:
        if not self.enabled:
            return False
        try:
            note = json.loads(self.note.read_text())
            if not isinstance(note, dict) or note.get("key") != self.key:
                return False
            data_ok = note.get("data_sha256") is None or note["data_sha256"] == checked.file_sha256(self.data, self.KIND)
            return data_ok and note.get("sha256") == checked.file_sha256(self.path, self.KIND)
        except (OSError, ValueError):
            return False

    def stage(self) -> Path | None:
        """Where onnxruntime should write the optimised graph (in a new folder of its own, its weights
        beside it under their final name), or None where there is no cache folder."""
        if not self.enabled:
            return None
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            import tempfile  # writers of the cache only (a cold search: see ann.py)

            return Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.folder)) / self.path.name
        except OSError:
            return None

    def publish(self, staged: Path | None) -> None:
        if staged is None:
            return
        try:
            staged_data = staged.with_name(self.data.name)
            data_sha256 = file_sha256(staged_data) if staged_data.exists() else None
            graph_sha256 = file_sha256(staged)
            if data_sha256 is not None:
                os.replace(staged_data, self.data)
            os.replace(staged, self.path)
            note = staged.with_name("note.json")
            note.write_text(json.dumps({"key": self.key, "sha256": graph_sha256, "data_sha256": data_sha256}))
            os.replace(note, self.note)
        except OSError:
            pass
        self.discard(staged)

    def discard(self, staged: Path | None) -> None:
        if staged is not None:
            import shutil  # writers of the cache only (see `stage`)

            shutil.rmtree(staged.parent, ignore_errors=True)


OPTIMISED_CACHE_ENV = "IMGSIM_OPTIMISED_CACHE"
"""Set to 0 to have onnxruntime optimise the model at every start instead of keeping its copy."""


def _cpu_features() -> str | None:
    """What this CPU offers, as finely as can be told cheaply: the `flags` (x86) or `Features` (Arm)
    line of /proc/cpuinfo where there is one, else the features numpy detected; None if neither."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return f"{platform.machine()}:{' '.join(sorted(set(value.split())))}"
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return f"{platform.machine()}:" + ",".join(sorted(name for name, present in __cpu_features__.items() if present))


def onnxruntime_module():
    """onnxruntime, imported with its telemetry off.

    On import, onnxruntime (1.2x and later on Linux too) starts a telemetry client that stores a
    device id and an event database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` and,
    where the home folder is not writable, prints a warning on every run. imgsim is offline and
    writes nothing it was not asked to: ``ORT_DISABLE_TELEMETRY=1`` (read at import; a value the
    user set is kept) turns the client off. If the caller imported onnxruntime first, the
    variable comes too late, and `disable_telemetry_events` is what remains.
    """
    os.environ.setdefault(TELEMETRY_ENV, "1")
    try:
        import onnxruntime
    except ImportError as e:
        # Ctrl-C while its extension module initialises comes out as "ImportError: initialization
        # failed" caused by the KeyboardInterrupt: an interrupt, not a broken install.
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise

    if os.environ[TELEMETRY_ENV] == "1":
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def parse_pooling(pooling: str) -> float | None:
    """``avg`` (the model's own ``embedding`` output) gives None; ``gemP`` gives P, optionally with
    regions: ``gemP-rmacL`` (R-MAC levels 1..L) and/or ``-cregNN`` (the centre NN % of each side)."""
    if pooling == "avg":
        return None
    head = pooling.split("-")[0]
    if head.startswith("gem"):
        try:
            p = float(head[3:])
        except ValueError:
            p = 0.0
        if 0.5 <= p <= 16:
            pooling_regions(pooling)
            return p
    raise ModelError(f"unknown pooling {pooling!r}: use avg or gemP, e.g. gem3 or gem3-creg60")


def pooling_regions(pooling: str) -> tuple[int, int]:
    """(R-MAC levels, centre region percent) of a pooling name; (0, 0) for the whole map only."""
    levels = centre = 0
    for part in pooling.split("-")[1:]:
        if part.startswith("rmac") and part[4:].isdigit() and 1 <= int(part[4:]) <= 4:
            levels = int(part[4:])
        elif part.startswith("creg") and part[4:].isdigit() and 10 <= int(part[4:]) <= 99:
            centre = int(part[4:])
        else:
            raise ModelError(f"unknown pooling {pooling!r}: region parts are rmac1-4 and creg10-99")
    return levels, centre


def regions(h: int, w: int, levels: int = 1, centre: int = 0) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) boxes on an h x w feature map whose pooled vectors are summed.

    Always the whole map; then R-MAC regions (Tolias et al., 2016) at levels l = 2..`levels`,
    squares of side 2 min(h, w) / (l + 1) on an l x l grid; then, with `centre`, the centre
    `centre` % of each side (what a tight centre crop of the picture keeps)."""
    out = [(0, 0, h, w)]
    for level in range(2, levels + 1):
        side = max(1, round(2 * min(h, w) / (level + 1)))
        tops = np.linspace(0, h - side, level).round().astype(int) if h > side else [0]
        lefts = np.linspace(0, w - side, level).round().astype(int) if w > side else [0]
        out += [(int(t), int(lf), min(side, h), min(side, w)) for t in tops for lf in lefts]
    if centre:
        ch, cw = max(1, round(h * centre / 100)), max(1, round(w * centre / 100))
        out.append(((h - ch) // 2, (w - cw) // 2, ch, cw))
    return out


def gem(feature_map: np.ndarray, p: float) -> np.ndarray:
    """Generalised-mean pooling over the spatial axes of (N, C, h, w): (mean x^p)^(1/p), x > 0.
    p = 1 is average pooling; large p tends to max pooling (Radenovic et al., 2018)."""
    x = np.maximum(feature_map.astype(np.float32, copy=False), 1e-6)
    return np.power(np.mean(np.power(x, p), axis=(2, 3)), 1.0 / p)


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
