"""A small document model rendered twice: one HTML page (inline CSS) and the same as markdown.

The demo builds its report as a list of sections of blocks (paragraphs, tables, figures,
preformatted text, an image gallery); images are PNG files under the report's folder,
linked by relative path, so the folder can be zipped, served or opened from disk. Written
here rather than with a templating library: five block types do not need Jinja, and the
markdown must say the same as the HTML.
"""

from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path

__all__ = ["Figure", "Gallery", "GalleryRow", "Para", "Pre", "Report", "Section", "Table", "write_report"]


@dataclasses.dataclass(frozen=True)
class Para:
    text: str
    """Plain text; `code` spans in backticks are kept as code."""


@dataclasses.dataclass(frozen=True)
class Pre:
    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


@dataclasses.dataclass(frozen=True)
class Figure:
    path: Path
    caption: str
    width: int = 480
    """Display width in CSS pixels (small images are scaled up without smoothing)."""


@dataclasses.dataclass(frozen=True)
class GalleryRow:
    prompt: str
    images: tuple[tuple[str, Path], ...]
    """(label, PNG) pairs shown side by side."""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Gallery:
    rows: tuple[GalleryRow, ...]
    size: int = 128
    """Display size of each image in CSS pixels."""


Block = Para | Pre | Table | Figure | Gallery


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    title: str
    intro: str
    sections: tuple[Section, ...]


CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
  padding:24px;color:#222}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px} th,td{border:1px solid #ddd;padding:3px 9px;text-align:left}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:13px}
code{background:#f0f0f0;padding:0 3px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figcaption{font-size:13px;color:#555;max-width:480px}
img{image-rendering:pixelated;border:1px solid #ccc}
.gallery td,.gallery th{text-align:center;vertical-align:top}
.gallery td.prompt,.gallery th:first-child{text-align:left;max-width:300px}
.note{font-size:12px;color:#666}
"""


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()


def _code(text: str) -> str:
    """Escape, then turn `spans` into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _num_class(value: object) -> str:
    """Numbers are right-aligned, text left."""
    try:
        float(str(value).replace(",", "").rstrip("x%"))
    except ValueError:
        return ""
    return ' class="n"'


def _html_block(b: Block, root: Path) -> str:
    if isinstance(b, Para):
        return f"<p>{_code(b.text)}</p>"
    if isinstance(b, Pre):
        return f"<pre>{html.escape(b.text)}</pre>"
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.head)
        rows = "".join(
            "<tr>" + "".join(f"<td{_num_class(c)}>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b.rows
        )
        return f"<table><tr>{head}</tr>{rows}</table>"
    if isinstance(b, Figure):
        return (
            f'<figure><img src="{html.escape(_rel(b.path, root))}" alt="{html.escape(b.caption)}" '
            f'style="width:{b.width}px"><figcaption>{_code(b.caption)}</figcaption></figure>'
        )
    labels = b.rows[0].images if b.rows else ()
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(label)}</th>" for label, _ in labels)
    body = []
    for r in b.rows:
        cells = "".join(
            f'<td><img src="{html.escape(_rel(p, root))}" alt="{html.escape(label)}" '
            f'width="{b.size}" height="{b.size}"></td>'
            for label, p in r.images
        )
        note = f'<div class="note">{html.escape(r.note)}</div>' if r.note else ""
        body.append(f'<tr><td class="prompt">{html.escape(r.prompt)}{note}</td>{cells}</tr>')
    return f'<table class="gallery"><tr>{head}</tr>{"".join(body)}</table>'


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block, root: Path) -> str:
    if isinstance(b, Para):
        return b.text
    if isinstance(b, Pre):
        return "```\n" + b.text + "\n```"
    if isinstance(b, Table):
        lines = ["| " + " | ".join(map(_md_cell, b.head)) + " |", "|" + "---|" * len(b.head)]
        lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
        return "\n".join(lines)
    if isinstance(b, Figure):
        return f"![{b.caption}]({_rel(b.path, root)})\n\n*{b.caption}*"
    labels = b.rows[0].images if b.rows else ()
    lines = ["| prompt | " + " | ".join(label for label, _ in labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for r in b.rows:
        prompt = _md_cell(r.prompt + (f" ({r.note})" if r.note else ""))
        lines.append(f"| {prompt} | " + " | ".join(f"![{label}]({_rel(p, root)})" for label, p in r.images) + " |")
    return "\n".join(lines)


def write_report(report: Report, folder: str | Path, stem: str = "report") -> tuple[Path, Path]:
    """Write FOLDER/STEM.html and FOLDER/STEM.md; image paths become relative to FOLDER."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    missing = [
        str(b.path) for s in report.sections for b in s.blocks if isinstance(b, Figure) and not Path(b.path).is_file()
    ]
    missing += [
        str(p)
        for s in report.sections
        for b in s.blocks
        if isinstance(b, Gallery)
        for r in b.rows
        for _, p in r.images
        if not Path(p).is_file()
    ]
    if missing:
        raise FileNotFoundError("report images missing: " + ", ".join(missing))
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(report.sections))
    body = [f"<h1>{html.escape(report.title)}</h1>", f"<p>{_code(report.intro)}</p>", f"<ol>{toc}</ol>"]
    md = [f"# {report.title}", "", report.intro, ""]
    for i, s in enumerate(report.sections):
        body.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
        body += [_html_block(b, root) for b in s.blocks]
        md += [f"## {s.title}", ""]
        for b in s.blocks:
            md += [_md_block(b, root), ""]
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    html_path, md_path = root / f"{stem}.html", root / f"{stem}.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
