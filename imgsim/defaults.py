"""Defaults that the command line shows in its options, kept in a module that imports nothing, so that
`imgsim --help` (and every command before it needs them) loads no numpy, Pillow, FAISS or onnxruntime.
Their homes, `images` and `dupes`, re-export them."""

DEFAULT_MAX_PIXELS = 150_000_000
"""Images whose header claims more pixels than this are refused before decoding (decompression bombs)."""

DEFAULT_THRESHOLD = 0.80
"""Pairs scoring at least this are duplicates. Chosen with scripts/eval_dupes.py on real photos:
see "Duplicates" in README.md for the precision and recall of pairs at each threshold."""
