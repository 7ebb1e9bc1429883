"""The evaluation report as a self-contained HTML page (`render_html`), with its data
as report.json and one CSV per table alongside.

`render_html` is a deliberately generic renderer: the evaluation stage assembles
sections (markers, Elo, preferences, ablation, gates, loss curves, cost, samples) and
this module only lays them out. The shape of `report` is documented on `render_html`.
The page skeleton and its CSS live in template.html next to this file.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from string import Template

import numpy as np

# string.Template rather than str.format: the CSS is full of braces and has no "$".
_TEMPLATE = Template(files(__package__).joinpath("template.html").read_text(encoding="utf-8"))

_BADGES = {"pass": "pass", "passed": "pass", "ok": "pass", "fail": "fail", "failed": "fail",
           "warn": "warn", "warning": "warn", "skipped": "warn"}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "section"


def _fmt(v) -> tuple[str, bool]:
    """Display text for a table cell, and whether it is numeric."""
    if v is None:
        return "—", False
    if isinstance(v, bool):
        return ("yes" if v else "no"), False
    if isinstance(v, int):
        return f"{v:,}", True
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—", True
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}", True
        return (f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"), True
    return str(v), False


def _cell(v) -> str:
    text, numeric = _fmt(v)
    esc = html.escape(text)
    badge = _BADGES.get(text.strip().lower()) if isinstance(v, str) else None
    if badge:
        esc = f'<span class="badge {badge}">{esc}</span>'
    cls = ' class="num"' if numeric else ""
    return f"<td{cls}>{esc}</td>"


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
    return "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in parts)


def _image_html(path, out_dir: Path, embed: bool, alt: str) -> str:
    p = Path(path)
    if not p.is_file():
        return f'<figure class="missing">image not found: {html.escape(str(path))}</figure>'
    if embed:
        mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml",
                "gif": "image/gif"}.get(p.suffix.lower().lstrip("."), "application/octet-stream")
        src = f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
    else:
        try:
            src = p.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            (out_dir / "images").mkdir(exist_ok=True)
            dest = out_dir / "images" / p.name
            shutil.copyfile(p, dest)
            src = f"images/{p.name}"
    return f'<figure><img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}"></figure>'


def _write_csv(path: Path, columns: list, rows: list) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [v]
    return list(v) if isinstance(v, Iterable) else [v]


def render_html(report: dict, out_dir, embed_images: bool = True) -> Path:
    """Write `out_dir/report.html`, `out_dir/report.json` and one CSV per table.

    `report`::

        {
          "title": str,                      # page heading
          "spec": str,                       # spec name or path (shown in the header)
          "run": str,                        # run / build name
          "generated": str,                  # timestamp; defaults to now (UTC, ISO 8601)
          "summary": {label: value, ...},    # optional: the header's summary box; by
                                             # default spec, run and number of sections
          "sections": [
            {
              "title": str,
              "text": str,                   # optional; blank lines separate paragraphs
              "table": {"columns": [...], "rows": [[...], ...]},   # optional
              "image": path | [paths],       # optional; PNG written by the plot_* helpers
              "samples": [                   # optional; side-by-side responses
                {"prompt": str, "responses": {model: text, ...}}, ...
              ],
            }, ...
          ],
        }

    Every string is HTML-escaped. Images are embedded as base64 data URIs so the page
    stands alone (`embed_images=False` references them relatively instead, copying any
    that live outside `out_dir` into `out_dir/images/`). Table CSVs are named
    `table-NN-<section-slug>.csv` and linked under their table. Returns the HTML path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = str(report.get("title") or "charbuild evaluation report")
    generated = str(report.get("generated") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    sections = list(report.get("sections") or [])
    summary = report.get("summary")
    if not summary:
        summary = {"spec": report.get("spec"), "run": report.get("run"), "sections": len(sections)}

    meta = []
    if report.get("run"):
        meta.append(f"run <code>{html.escape(str(report['run']))}</code>")
    if report.get("spec"):
        meta.append(f"spec <code>{html.escape(str(report['spec']))}</code>")
    meta.append(f"generated {html.escape(generated)}")

    body: list[str] = []
    toc: list[str] = []
    csv_files: list[str] = []
    used_ids: set[str] = set()
    for i, sec in enumerate(sections, 1):
        stitle = str(sec.get("title") or f"Section {i}")
        sid = _slug(stitle)
        while sid in used_ids:
            sid += f"-{i}"
        used_ids.add(sid)
        toc.append(f'<a href="#{sid}">{html.escape(stitle)}</a>')
        parts = [f'<section id="{sid}">', f"<h2>{html.escape(stitle)}</h2>"]
        if sec.get("text"):
            parts.append(_paragraphs(sec["text"]))
        table = sec.get("table")
        if table:
            columns = list(table.get("columns") or [])
            rows = [list(r) for r in (table.get("rows") or [])]
            csv_name = f"table-{i:02d}-{sid}.csv"
            _write_csv(out_dir / csv_name, columns, rows)
            csv_files.append(csv_name)
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            trs = "\n".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
            parts.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>\n'
                         f"<tbody>\n{trs}\n</tbody></table></div>")
            parts.append(f'<div class="csv"><a href="{html.escape(csv_name, quote=True)}">{html.escape(csv_name)}</a>'
                         f" · {len(rows)} row{'s' if len(rows) != 1 else ''}</div>")
        for img in _as_list(sec.get("image")):
            parts.append(_image_html(img, out_dir, embed_images, stitle))
        for s in sec.get("samples") or []:
            responses = s.get("responses") or {}
            cards = "".join(f'<div class="response"><h3>{html.escape(str(m))}</h3>'
                            f"<div>{html.escape(str(t) if t is not None else '—')}</div></div>"
                            for m, t in responses.items())
            parts.append(f'<div class="sample"><div class="prompt"><b>Prompt</b>{html.escape(str(s.get("prompt", "")))}'
                         f'</div><div class="responses">{cards}</div></div>')
        parts.append("</section>")
        body.append("\n".join(parts))

    summary_html = "".join(f"<div><dt>{html.escape(str(k))}</dt><dd>{html.escape(_fmt(v)[0])}</dd></div>"
                           for k, v in summary.items())
    page = _TEMPLATE.substitute(title=html.escape(title), meta=" · ".join(meta), summary=summary_html,
                                toc="".join(toc), body="\n".join(body))
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    data = dict(report, generated=generated, csv=csv_files)
    (out_dir / "report.json").write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False), encoding="utf-8")
    return html_path
