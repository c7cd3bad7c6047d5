"""`Index.image` and `Index.vector`: one image's row and stored embedding by id (what `imgsim serve`
uses for /images, /thumbs and /similar, with no re-embedding)."""

from __future__ import annotations

import numpy as np

from imgsim import Index

from .conftest import TINY_MODEL


def test_image_and_vector_by_id(tmp_path, photos):
    with Index.create(tmp_path / "ids", model=TINY_MODEL) as index:
        index.add(photos)
        hit = index.search(photos / "coffee.jpg", k=1)[0]
        row = index.image(hit.id)
        assert (row.id, row.path, row.width, row.height, row.format) == (hit.id, "coffee.jpg", 600, 400, "JPEG")
        vector = index.vector(hit.id)
        assert vector.dtype == np.float32 and vector.shape == (48,)
        np.testing.assert_allclose(vector, index.embed(photos / "coffee.jpg"), atol=1e-3)  # stored as float16
        assert index.search(vector, k=1)[0].id == hit.id
        assert index.image(999_999) is None and index.vector(999_999) is None
        (photos / "coffee.jpg").unlink()
        index.sync(photos)
        assert index.image(hit.id) is None and index.vector(hit.id) is None
