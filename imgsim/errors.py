"""The exceptions imgsim raises. Every one is an `ImgsimError`, and its message says what to do."""


class ImgsimError(Exception):
    """Base class: anything imgsim refuses or cannot do."""


class IndexNotFoundError(ImgsimError):
    """The index files are not where they were looked for."""


class IndexCorruptError(ImgsimError):
    """An index file is damaged, truncated, or not an imgsim index at all."""


class IndexLockedError(ImgsimError):
    """Another process is writing to this index."""


class ReadOnlyIndexError(ImgsimError):
    """A write was attempted on an index opened read-only, or where it cannot be written (a read-only
    file system, a folder this user cannot write): such an index can still be opened read-only."""


class ModelError(ImgsimError):
    """A model is unknown, missing, damaged, or not the one the index was made with."""


class ImageError(ImgsimError):
    """A file could not be read as an image."""
