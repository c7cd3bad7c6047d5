"""Defaults that the command line shows in its options, kept in a module that imports nothing, so that
`imgsim --help` (and every command before it needs them) loads no numpy, Pillow, FAISS or onnxruntime.
Their homes, `images` and `dupes`, re-export them."""

DEFAULT_MAX_PIXELS = 150_000_000
"""Images whose header claims more pixels than this are refused before decoding (decompression bombs)."""

DEFAULT_THRESHOLD = 0.80
"""Pairs scoring at least this are duplicates, for models without a threshold of their own in
`MODEL_THRESHOLDS`. Chosen with scripts/eval_dupes.py on real photos: see "Duplicates" in README.md
for the precision and recall of pairs at each threshold."""

MODEL_THRESHOLDS = {"efficientnet-lite0-lw": 0.74, "efficientnet-lite0-lw-int8": 0.74}
"""Models whose scores are spread differently: the learned whitening of efficientnet-lite0-lw scores
unlike pictures lower and copies a little lower too; at 0.74 it keeps more copies and fewer false
pairs than plain Lite0 at 0.80 (scripts/eval_dupes.py, README "Duplicates")."""


THRESHOLDS_SAID = "the index model's: " + ", ".join(
    [f"{t:g} for {' and '.join(m for m in MODEL_THRESHOLDS if MODEL_THRESHOLDS[m] == t)}"
     for t in sorted(set(MODEL_THRESHOLDS.values()))] + [f"{DEFAULT_THRESHOLD:g} for other models"])
"""The default threshold in words, for the command line's and the HTTP API's help."""


def dupes_threshold(model: str) -> float:
    """The default duplicate threshold of an index made with `model`."""
    return MODEL_THRESHOLDS.get(model, DEFAULT_THRESHOLD)
