"""What the answers look like, for the OpenAPI documentation at /docs only: answers are built as plain
dicts and never filtered through these models, so a field `imgsim search --json` gains reaches HTTP
clients too (tests/test_serve.py checks that every documented field is there)."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorAnswer(BaseModel):
    error: str


class Result(BaseModel):
    rank: int
    id: int
    path: str
    score: float
    width: int
    height: int
    format: str
    size: int
    query: str | None
    date: str
    labels: list[str]
    image_id: int
    image_path: str
    similarity: float
    image_url: str
    thumb_url: str


class SearchAnswer(BaseModel):
    results: list[Result]
    query: dict
    took_ms: float


def errors(*codes: int) -> dict:
    """The `responses` entry documenting these error codes with their JSON body."""
    described = {400: "Bad request", 401: "Token missing or wrong", 403: "Not from this machine, or a foreign Host",
                 404: "No such image", 408: "Upload too slow", 413: "Upload or image too large",
                 415: "Not an image", 422: "Invalid parameter, or an unreadable image",
                 501: "Not supported by this imgsim yet", 503: "Busy"}
    return {code: {"model": ErrorAnswer, "description": described[code]} for code in codes}
