"""Uploaded images: read with a size limit and a deadline, kept in memory only, identified by decoding.

Starlette's form parser spools uploads over 1 MB to a temporary file; an upload here never touches
the disk: the body is read into memory (at most `max_bytes`), the multipart parts are split in
memory, and the image is decoded from a `BytesIO` by the same decoder (and pixel cap) as indexing.
The file name and content type a client sends are ignored: only decoding says what a file is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .. import images as imgs
from ..errors import ImageError
from .errors import ApiError

UPLOAD_FIELD = "file"


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


async def read_body(request: Request, max_bytes: int, seconds: float) -> bytes:
    """The whole request body, refused (413) as soon as it is known to exceed `max_bytes`, and
    (408) if it has not arrived within `seconds`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if declared_size > max_bytes:
            raise ApiError(413, too_large(max_bytes))
    body = bytearray()
    try:
        with anyio.fail_after(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise ApiError(413, too_large(max_bytes))
    except TimeoutError:
        raise ApiError(408, f"the upload did not arrive within {seconds:g} s") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before the upload was complete") from None
    return bytes(body)


def too_large(max_bytes: int) -> str:
    return f"the upload is larger than the limit of {max_bytes / 1e6:g} MB (--max-upload-mb)"


def image_from_body(content_type: str, body: bytes) -> Upload:
    """The image in a request body: the form field `file` of a multipart/form-data body (the
    tutorial's contract), or any other body taken as the image itself (`curl --data-binary @x.jpg`)."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        if not body:
            raise ApiError(400, f"no image: send it as multipart/form-data in the field `{UPLOAD_FIELD}`")
        return Upload(body, None)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary")
    parts = _split_multipart(boundary, body)
    for name, filename, data in parts:
        if name == UPLOAD_FIELD:
            if not data:
                raise ApiError(400, f"the form field `{UPLOAD_FIELD}` is empty")
            return Upload(data, filename)
    raise ApiError(400, f"no form field `{UPLOAD_FIELD}`: send the image as multipart/form-data in the field "
                        f"`{UPLOAD_FIELD}`")


def _split_multipart(boundary: bytes, body: bytes, max_parts: int = 16) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, data) for each part of a multipart body held in memory."""
    parts: list[tuple[str, str | None, bytes]] = []
    state = {"headers": [], "field": b"", "value": b"", "data": []}

    def on_part_begin():
        state.update(headers=[], field=b"", value=b"", data=[])

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"].append((state["field"].lower(), state["value"]))
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        state["data"].append(data[start:end])

    def on_part_end():
        if len(parts) >= max_parts:
            raise ApiError(400, f"too many form fields (at most {max_parts})")
        disposition = dict(state["headers"]).get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        parts.append((name, filename, b"".join(state["data"])))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python-multipart raises several types for malformed bodies
        raise ApiError(400, f"malformed multipart/form-data body: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return parts


def decode_upload(upload: Upload, min_side: int, max_pixels: int) -> imgs.Decoded:
    """Decode an upload exactly as indexing decodes a file: the format from the content, the pixel cap
    from the header before decoding (decompression bombs), draft-mode JPEG, EXIF orientation, RGB."""
    try:
        return imgs.decode_stream(io.BytesIO(upload.data), min_side, max_pixels)
    except ImageError as e:
        reason = str(e)
        status = 413 if "over the limit" in reason else 415 if "unrecognised format" in reason else 422
        raise ApiError(status, f"not a readable image: {reason}") from None
