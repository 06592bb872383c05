"""A self-contained HTML report: inline CSS, tables, and PNG plots embedded as data URIs (no network, no JS)."""

from __future__ import annotations

import base64
import html
import os
from typing import Any, Collection, Sequence

__all__ = ["render_html", "table_html"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem} th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;
min-width:11rem} .card b{display:block;font-size:1.3rem} .card small{color:#666} .warn{color:#a33}
img{max-width:100%} tr.chosen td{background:#fff3c4;font-weight:600}
.decision{font-size:1.05rem;border-left:4px solid #2b6cb0;background:#f3f7fc;padding:.6rem 1rem;margin:1rem 0}
"""


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return f"<td>{'yes' if v else 'no'}</td>"
    if isinstance(v, int):
        return f'<td class="n">{v:,}</td>'
    if isinstance(v, float):
        return f'<td class="n">{v:.4g}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str | None = None,
               highlight: Collection[int] = ()) -> str:
    """A table; the rows whose index is in ``highlight`` get ``class="chosen"`` (shaded, bold)."""
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(("<tr class=\"chosen\">" if i in highlight else "<tr>") + "".join(_cell(v) for v in r) + "</tr>"
                   for i, r in enumerate(rows))
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card_label(label: str) -> str:
    head, _, note = label.partition("\n")
    return html.escape(head) + (f"<br><small>{html.escape(note)}</small>" if note else "")


def _img(path: str | None, alt: str) -> str:
    if not path or not os.path.exists(path):
        return f'<p class="warn">({html.escape(alt)}: plot not available)</p>'
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(title: str, subtitle: str, cards: Sequence[tuple[str, str]],
                sections: Sequence[tuple[str, str]], images: Sequence[tuple[str, str | None]] = (),
                lead: str = "") -> str:
    """Build the page. ``lead`` (HTML, e.g. the decision) comes first under the title; ``cards`` are ``(label,
    value)``, a label may carry a second line after ``\\n`` (what the number describes); ``sections`` are
    ``(heading, html_body)``; ``images`` ``(alt, png_path)`` go after the cards. Every image is embedded, so
    the file can be mailed or opened offline."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", f'<p class="sub">{html.escape(subtitle)}</p>', lead,
        '<div class="cards">' + "".join(
            f'<div class="card">{_card_label(k)}<b>{html.escape(v)}</b></div>' for k, v in cards) + "</div>",
    ]
    for alt, path in images:
        parts.append(f"<h2>{html.escape(alt)}</h2>{_img(path, alt)}")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)
