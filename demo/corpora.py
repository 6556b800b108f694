"""Shapes-world raw corpora in the formats users bring, and the localhost server that serves them.

LLaVA JSONL with image files, a URL list behind a localhost HTTP server (for img2dataset),
clips of a moving shape (video files and frame folders) with a video-QA JSONL, and editing
triplets; each writer can add one bad record per quarantine case it covers. The scenes come
from `vpit.shapes`; the demo, the tests and the benchmarks all draw their raw data from here.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vpit.errors import ConfigError
from vpit.shapes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    caption,
    encode_image,
    questions,
    random_edit,
    random_scene,
    render,
)

__all__ = [
    "BAD_CLIP_CASES",
    "BAD_EDIT_CASES",
    "BAD_LLAVA_CASES",
    "BAD_PAIR_CASES",
    "DIRECTIONS",
    "moving_shape_frames",
    "serve_http",
    "write_bad_clips",
    "write_bad_llava_records",
    "write_clips",
    "write_edit_triplets",
    "write_llava_dataset",
    "write_pairs",
    "write_video",
    "write_videoqa_records",
]


def write_llava_dataset(out: Path, n: int, seed: int = 0, size: int = 64, turns: int = 2) -> dict[str, Any]:
    """Write `n` LLaVA-format records (data.jsonl) and their images (images/) under `out`.

    Every 10th record is text-only and every 7th has two images, so all input forms occur.
    Returns {"jsonl": path, "image_root": path, "ids": [...]}.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ids, lines = [], []
    for i in range(n):
        scene = random_scene(rng)
        rec: dict[str, Any] = {"id": f"shapes-{i:06d}"}
        qa = questions(scene)
        picks = rng.permutation(len(qa))[:turns]
        conv = []
        if i % 10 == 9:  # text-only: a question about a described scene
            conv = [
                {"from": "human", "value": f"A picture shows {caption(scene)}. {qa[picks[0]][0]}"},
                {"from": "gpt", "value": qa[picks[0]][1]},
            ]
        else:
            fmt = "JPEG" if i % 2 else "PNG"
            name = f"images/{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (out / name).write_bytes(encode_image(render(scene, size), fmt))
            rec["image"] = name
            for t, p in enumerate(picks):
                q, a = qa[p]
                conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            if i % 7 == 6:
                other = random_scene(rng)
                name2 = f"images/{i:06d}-b.png"
                (out / name2).write_bytes(encode_image(render(other, size)))
                rec["image"] = [name, name2]
                conv += [
                    {"from": "human", "value": "<image>\nHow many shapes are in the second picture?"},
                    {"from": "gpt", "value": str(len(other.shapes))},
                ]
        if i % 5 == 0:
            rec["system"] = "You are a careful assistant that answers questions about pictures."
        rec["conversations"] = conv
        lines.append(json.dumps(rec))
        ids.append(rec["id"])
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jsonl": path, "image_root": out, "ids": ids}


# One raw record per bad case that the LLaVA ingest must quarantine, with its reason code.
BAD_LLAVA_CASES = (
    "malformed_json",
    "missing_image",
    "unreadable_image",  # garbage bytes
    "unreadable_image",  # a truncated PNG
    "image_too_large",
    "placeholder_mismatch",
    "empty_conversation",
    "one_sided_conversation",
    "unknown_role",
    "non_utf8",
    "path_escape",
)


def write_bad_llava_records(out: Path, size: int = 64, bomb_side: int = 3000) -> list[bytes]:
    """Write the images the bad cases need under `out` and return one raw JSONL line per case
    of `BAD_LLAVA_CASES`, in that order. The bomb is `bomb_side`^2 pixels (a solid PNG, a
    few kB on disk): ingest it with max_pixels below that."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    good = encode_image(render(Scene("white", (("circle", "red", "top left"),)), size))
    (out / "images/bad-garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (out / "images/bad-truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (bomb_side, bomb_side), (0, 0, 0)).save(out / "images/bad-bomb.png")
    (out / "images/bad-ok.png").write_bytes(good)
    (out.parent / "outside.png").write_bytes(good)

    def rec(i, image, conv):
        r = {"id": f"bad-{i}", "conversations": conv}
        if image is not None:
            r["image"] = image
        return json.dumps(r).encode()

    qa = [{"from": "human", "value": "<image>\nWhat shape is red?"}, {"from": "gpt", "value": "circle"}]
    return [
        b'{"id": "bad-0", "conversations": [{"from": "human", "value": "hi"',
        rec(1, "images/does-not-exist.png", qa),
        rec(2, "images/bad-garbage.jpg", qa),
        rec(3, "images/bad-truncated.png", qa),
        rec(4, "images/bad-bomb.png", qa),
        rec(
            5,
            "images/bad-ok.png",
            [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}],
        ),
        rec(
            6, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "  "}]
        ),
        rec(7, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat shape is red?"}]),
        rec(8, "images/bad-ok.png", [{"from": "human", "value": "<image>\nWhat?"}, {"from": "robot", "value": "beep"}]),
        b'{"id": "bad-9", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "yes"}]}',
        rec(10, "../outside.png", qa),
    ]


# One URL per bad case that the pairs ingest must quarantine, with its reason code, in order:
# a 404, an image served with `X-Robots-Tag: noai`, an HTML page, a truncated PNG, an empty caption.
BAD_PAIR_CASES = ("download_failed", "download_disallowed", "unreadable_image", "unreadable_image", "missing_field")


class _ShapesHandler(SimpleHTTPRequestHandler):
    delay_s = 0.0

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def end_headers(self):
        if "/noai-" in self.path:  # the opt-out header img2dataset honours by default
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def do_GET(self):
        if self.delay_s:
            time.sleep(self.delay_s)
        super().do_GET()


@contextlib.contextmanager
def serve_http(root: Path, delay_s: float = 0.0):
    """Serve `root` on 127.0.0.1 (a free port) from a thread; yield the base URL.

    Files under a name starting with `noai-` are sent with `X-Robots-Tag: noai`; `delay_s`
    slows every response (for kill-while-downloading tests).
    """
    handler_cls = type("Handler", (_ShapesHandler,), {"delay_s": delay_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_cls, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_pairs(
    out: Path,
    n: int,
    base_url: str,
    seed: int = 0,
    size: int = 64,
    fmt: str = "parquet",
    bad: bool = True,
    image_formats: tuple[str, ...] = ("PNG", "JPEG"),
) -> dict[str, Any]:
    """Write `n` captioned images under `out/www` and a URL list (`out/urls.parquet` or `.csv`)
    pointing at `base_url` (serve `out/www` there), the images in turn in each of `image_formats`.
    With `bad`, one URL per `BAD_PAIR_CASES` follows the good ones. Returns {"url_list", "www",
    "captions", "urls"}, the last two aligned with the rows of the list."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    out = Path(out)
    www = out / "www"
    (www / "img").mkdir(parents=True, exist_ok=True)
    urls, captions = [], []
    for i in range(n):
        scene = random_scene(rng)
        fmt_img = image_formats[i % len(image_formats)]
        ext = {"PNG": "png", "JPEG": "jpg"}[fmt_img]
        (www / "img" / f"{i:06d}.{ext}").write_bytes(encode_image(render(scene, size), fmt_img))
        urls.append(f"{base_url}/img/{i:06d}.{ext}")
        captions.append(caption(scene))
    if bad:
        good = encode_image(render(Scene("white", (("circle", "red", "top left"),)), size))
        (www / "img" / "noai-000.png").write_bytes(good)
        (www / "page.html").write_text("<html><body>not an image</body></html>")
        (www / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
        (www / "img" / "ok.png").write_bytes(good)
        urls += [
            f"{base_url}/img/missing.png",
            f"{base_url}/img/noai-000.png",
            f"{base_url}/page.html",
            f"{base_url}/img/truncated.png",
            f"{base_url}/img/ok.png",
        ]
        captions += ["a red circle", "a red circle", "a red circle", "a red circle", "  "]
    table = pa.table({"url": urls, "caption": captions})
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = out / "urls.parquet"
        pq.write_table(table, path)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        path = out / "urls.csv"
        pcsv.write_csv(table, path)
    else:
        raise ConfigError(f"fmt: expected 'parquet' or 'csv', got {fmt!r}")
    return {"url_list": path, "www": www, "captions": captions, "urls": urls}


DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def moving_shape_frames(rng: np.random.Generator, frames: int, size: int) -> tuple[list[Image.Image], dict[str, str]]:
    """A shape crossing a plain background in one direction, one step per frame."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    r = max(3, size // 6)
    other = int(rng.integers(r, size - r))  # the fixed coordinate
    travel = np.linspace(r, size - r - 1, frames)
    if dx < 0 or dy < 0:
        travel = travel[::-1]
    images = []
    for t in range(frames):
        cx, cy = (travel[t], other) if dx else (other, travel[t])
        img = Image.new("RGB", (size, size), BACKGROUNDS[background])
        draw = ImageDraw.Draw(img)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=COLORS[color])
        images.append(img)
    return images, {"shape": shape, "color": color, "background": background, "direction": direction}


def write_video(path: Path, images: list[Image.Image], fps: int = 8, codec: str = "libx264") -> None:
    """Encode frames with PyAV. `codec="ffv1"` (in .mkv) is lossless: decoded frames equal the input."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = images[0].size
        stream.pix_fmt = {"ffv1": "bgr0", "png": "rgb24"}.get(codec, "yuv420p")
        for img in images:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_clips(
    out: Path,
    n: int,
    seed: int = 0,
    frames: int = 12,
    size: int = 32,
    codec: str = "libx264",
    ext: str = "mp4",
    as_folders: bool = False,
) -> list[dict[str, Any]]:
    """Write `n` clips of a moving shape under `out` (video files, or folders of PNG frames with
    `as_folders`). Returns one dict per clip: path, shape, color, background, direction, frames."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        images, meta = moving_shape_frames(rng, frames, size)
        if as_folders:
            path = out / f"clip-{i:04d}"
            path.mkdir(exist_ok=True)
            for t, img in enumerate(images):
                (path / f"{t:06d}.png").write_bytes(encode_image(img))
        else:
            path = out / f"clip-{i:04d}.{ext}"
            write_video(path, images, codec=codec)
        clips.append(dict(meta, path=path, frames=frames))
    return clips


# One clip per bad case that the video ingest must quarantine, in the order `write_bad_clips` writes them.
BAD_CLIP_CASES = ("unreadable_video", "too_few_frames", "too_few_frames", "unreadable_image")


def write_bad_clips(out: Path, size: int = 32) -> list[Path]:
    """Garbage bytes named .mp4, a 2-frame clip, an empty frame folder, a folder with a corrupt frame."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    garbage = out / "zz-bad-garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video at all" * 4)
    short = out / "zz-bad-short.mp4"
    write_video(short, moving_shape_frames(rng, 2, size)[0])
    empty = out / "zz-bad-empty"
    empty.mkdir(exist_ok=True)
    corrupt = out / "zz-bad-corrupt"
    corrupt.mkdir(exist_ok=True)
    for t, img in enumerate(moving_shape_frames(rng, 12, size)[0]):
        data = encode_image(img)
        (corrupt / f"{t:06d}.png").write_bytes(data[: len(data) // 3] if t == 2 else data)
    return [garbage, short, empty, corrupt]


def write_videoqa_records(out: Path, clips: list[dict[str, Any]], video_root: Path) -> Path:
    """LLaVA-format records with a `video` field (paths relative to `video_root`), one
    question per clip with a single right answer: the direction of motion."""
    lines = []
    for i, clip in enumerate(clips):
        rel = Path(clip["path"]).relative_to(video_root).as_posix()
        lines.append(
            json.dumps(
                {
                    "id": f"videoqa-{i:05d}",
                    "video": rel,
                    "conversations": [
                        {
                            "from": "human",
                            "value": f"<video>\nWhich way does the {clip['color']} {clip['shape']} move?",
                        },
                        {"from": "gpt", "value": clip["direction"]},
                    ],
                }
            )
        )
    path = Path(out) / "videoqa.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# One triplet per bad case that the editing ingest must quarantine, in order.
BAD_EDIT_CASES = ("missing_field", "missing_image", "identical_images")


def write_edit_triplets(
    out: Path, n: int, seed: int = 0, size: int = 64, layout: str = "generic", fmt: str = "jsonl", bad: bool = True
) -> dict[str, Any]:
    """Write `n` editing triplets (recolour/move edits) plus, with `bad`, one per `BAD_EDIT_CASES`.

    `generic` stores image paths relative to `out`; `instructpix2pix` and `magicbrush` store the
    images inline as {"bytes", "path"} structs (base64 bytes in JSONL), like their HF datasets.
    Returns {"path", "image_root", "instructions"}.
    """
    from vpit.pipelines.editing import LAYOUTS

    src_f, ins_f, tgt_f = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    inline = layout != "generic"

    def image(name: str, scene: Scene) -> Any:
        data = encode_image(render(scene, size))
        if not inline:
            (out / "images" / name).write_bytes(data)
            return f"images/{name}"
        return {"bytes": data if fmt == "parquet" else base64.b64encode(data).decode(), "path": name}

    rows, instructions = [], []
    for i in range(n):
        scene = random_scene(rng, max_shapes=2)
        instruction, edited = random_edit(rng, scene)
        rows.append(
            {
                "id": f"edit-{i:05d}",
                src_f: image(f"{i:05d}-src.png", scene),
                ins_f: instruction,
                tgt_f: image(f"{i:05d}-tgt.png", edited),
            }
        )
        instructions.append(instruction)
    if bad:
        scene = Scene("white", (("circle", "red", "top left"),))
        rows.append({"id": "bad-0", src_f: None, ins_f: "make the red circle blue", tgt_f: image("b0-tgt.png", scene)})
        missing = "images/does-not-exist.png" if not inline else {"bytes": None, "path": "does-not-exist.png"}
        rows.append(
            {"id": "bad-1", src_f: image("b1-src.png", scene), ins_f: "make the red circle blue", tgt_f: missing}
        )
        rows.append(
            {
                "id": "bad-2",
                src_f: image("b2-src.png", scene),
                ins_f: "make the red circle red",
                tgt_f: image("b2-tgt.png", scene),
            }
        )
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = out / "edits.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = out / "edits.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"path": path, "image_root": out, "instructions": instructions}
