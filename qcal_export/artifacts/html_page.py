"""The HTML report's frame: the page shell with its inline style and the few lines of vanilla
JavaScript that sort tables, and the table and section builders the sections share. No network,
no external asset: the file opens the same anywhere."""

from __future__ import annotations

import html
from collections.abc import Sequence

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;
 padding:0 24px 48px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin:.8em 0 .2em}h2{border-bottom:2px solid #e3e3e3;padding-top:.6em}
.sub{color:#666;margin-top:0}.lead{color:#444;max-width:60em}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.pass{background:#e6f4ea;color:#1e6b34}.fail{background:#fde8e8;color:#a1221b}
.none{background:#f1f1f1;color:#444}
.warn{background:#fff6e0;border-left:4px solid #f0a500;padding:6px 12px;margin:4px 0}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.92em}
th,td{border-bottom:1px solid #e6e6e6;padding:3px 10px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th.sort{cursor:pointer;background:#f6f6f6;user-select:none}
th.sort:after{content:' \\2195';color:#aaa}
table.kv th{background:none;font-weight:600;width:12em}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots>div{flex:0 0 auto}
svg{max-width:100%;height:auto}details{margin:6px 0}summary{cursor:pointer;color:#225}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
"""
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
 table.querySelectorAll('th').forEach(function(th,col){
  th.classList.add('sort');
  th.addEventListener('click',function(){
   var body=table.tBodies[0],rows=Array.from(body.rows),up=th.dataset.up!=='1';
   var key=function(r){var c=r.cells[col];var v=c.dataset.v!==undefined?c.dataset.v:c.textContent;
    var n=parseFloat(v);return isNaN(n)?v.toLowerCase():n;};
   rows.sort(function(a,b){var x=key(a),y=key(b);if(typeof x!==typeof y){x=String(x);y=String(y);}
    return (x<y?-1:x>y?1:0)*(up?1:-1);});
   th.dataset.up=up?'1':'0';rows.forEach(function(r){body.appendChild(r);});
  });
 });
});
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def page(title: str, body: Sequence[str]) -> str:
    """The whole document: ``body`` (HTML fragments) inside the shell."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script></body></html>\n"
    )


def section(anchor: str, title: str, parts: Sequence[str], lead: str = "") -> str:
    """An ``<h2>`` section; ``lead`` a sentence saying what it shows."""
    intro = f"<p class='lead'>{esc(lead)}</p>" if lead else ""
    return f"<section id='{anchor}'><h2>{esc(title)}</h2>{intro}{''.join(parts)}</section>"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], sortable: bool = True) -> str:
    """A table; numbers right-aligned and shown at 4 significant digits (cosines at 6
    decimals where a header says cosine), sorted by their value when ``sortable``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(v, h) for v, h in zip(row, headers, strict=True)) + "</tr>"
        for row in rows
    )
    css = " class='sortable'" if sortable else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """A two-column table of labels and values (values as given, escaped)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f"<table class='kv'><tbody>{rows}</tbody></table>"


def number(value: object, header: str = "") -> str:
    """A number as the tables show it: cosines at 6 decimals, others at 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if "cosine" in header:
        return f"{value:.6f}"
    return f"{value:.4g}"


def _cell(value: object, header: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<td class='num' data-v='{value!r}'>{esc(number(value, header))}</td>"
    if value is None:
        return "<td class='num' data-v=''>-</td>"
    return f"<td>{esc(value)}</td>"


def details(summary: str, inner: str) -> str:
    """A folded block (``<details>``) under a one-line summary."""
    return f"<details><summary>{esc(summary)}</summary>{inner}</details>"
