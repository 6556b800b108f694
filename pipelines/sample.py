"""The instruction sample: the record every stage reads and writes (see ARCHITECTURE.md).

A sample is a JSON record plus the bytes of its images. Adapters build samples from raw
records and reject bad ones by raising `Rejected` with a reason code from `REASONS`; the
shard writer turns a rejection into a quarantine line, so no adapter ever stops a job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings

from PIL import Image

from vpit.errors import ConfigError
from vpit.records import ImageEntry, Part, Record

__all__ = [
    "KINDS",
    "REASONS",
    "ROLES",
    "Rejected",
    "Sample",
    "check_image",
    "image_entry",
    "split_placeholders",
]

KINDS = ("understanding", "generation", "video", "editing", "thinking", "text")
ROLES = ("system", "user", "assistant")

# Quarantine reason codes, shared by every adapter so reports add up across sources.
REASONS = {
    "malformed_json": "the raw record is not valid JSON (or nested too deeply to parse)",
    "record_too_large": "the raw record is larger than the record size limit",
    "non_utf8": "the raw record is not valid UTF-8",
    "missing_field": "a required field is absent or has the wrong type",
    "missing_image": "an image file does not exist",
    "path_escape": "an image path points outside the image root",
    "unreadable_image": "image bytes cannot be decoded (corrupt or truncated)",
    "image_too_large": "image exceeds the pixel limit (decompression bomb guard)",
    "placeholder_mismatch": "number of <image> placeholders differs from number of images",
    "empty_conversation": "no turns, or a turn with empty text",
    "one_sided_conversation": "the conversation lacks a user or an assistant turn",
    "unknown_role": "a turn's role is not one of the known roles",
    "download_failed": "the image could not be downloaded",
    "download_disallowed": "the server opted the image out of AI use "
    "(X-Robots-Tag, img2dataset's disallowed_header_directives)",
    "unreadable_video": "the video cannot be decoded",
    "missing_video": "a video file or frame folder does not exist",
    "too_few_frames": "the clip has fewer frames than the sample needs",
    "identical_images": "source and target images are identical",
}


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def clean_detail(text: str) -> str:
    """A message as the quarantine keeps it: object reprs with memory addresses (which differ between
    two identical runs and tell the user nothing) become the object's type."""
    return _ADDRESS.sub(r"<\1>", text)


class Rejected(Exception):
    """A raw record that cannot become a sample. `field` names where the problem is."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ConfigError(f"unknown quarantine reason {reason!r}; add it to REASONS")
        detail = clean_detail(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(slots=True)
class Sample:
    """One instruction sample: its JSON record and the stored bytes of each image member."""

    record: Record
    images: list[bytes]

    @property
    def id(self) -> str:
        return self.record["id"]


_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def check_image(data: bytes, where: str, max_pixels: int) -> tuple[str, int, int]:
    """Fully decode `data` and return (extension, width, height), or raise `Rejected`.

    The size is checked from the header before any pixel is decoded, so a decompression
    bomb is refused without allocating it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected(
                    "image_too_large",
                    f"{where}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
                )
            fmt = img.format
            img.load()  # raises on truncated or corrupt data
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("image_too_large", f"{where}: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("unreadable_image", f"{where}: not an image format PIL can read") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise Rejected("unreadable_image", f"{where}: {type(e).__name__}: {e}") from None
    if fmt not in _FORMAT_EXT:
        raise Rejected("unreadable_image", f"{where}: unsupported image format {fmt!r}")
    return _FORMAT_EXT[fmt], width, height


def image_entry(index: int, data: bytes, where: str, max_pixels: int) -> ImageEntry:
    """Validate one image and return its entry for the record's `images` list."""
    ext, width, height = check_image(data, where, max_pixels)
    return {
        "member": f"img{index}.{ext}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": width,
        "height": height,
    }


def split_placeholders(text: str, next_image: int, placeholder: str = "<image>") -> list[Part]:
    """Split `text` at placeholders into content parts, numbering images from `next_image`.

    Whitespace that only separates a placeholder from text (LLaVA writes "<image>\\n") is
    dropped; everything else is kept as written.
    """
    parts: list[Part] = []
    pieces = text.split(placeholder)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"image": next_image})
            next_image += 1
        piece = piece.strip()
        if piece:
            parts.append({"text": piece})
    return parts
