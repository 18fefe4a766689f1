"""``index.html``: one static page over an explorer's outputs. No script, no server, no
network: plain HTML with relative links, so it works opened from disk and copied anywhere
with its folder."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lowres_ssl.files import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.groups { display: flex; flex-wrap: wrap; gap: 1em; }
.groups figure { margin: 0; width: 250px; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _img(src: str, alt: str) -> str:
    return f'<a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(alt)}" loading="eager"></a>'


def _link(href: str, text: str | None = None) -> str:
    return f'<a href="{_e(href)}">{_e(text or href)}</a>'


def _overview(s: dict) -> str:
    m = s["model"]
    rows = [
        (
            "model",
            f"{m['source']} ({m['backbone']}, {m['size']} px"
            + (", random init)" if m["random_init"] else ")"),
        ),
        ("folder", s["folder"]),
        ("images", f"{s['images']:,} (feature width {s['features']})"),
        ("skipped files", s["skipped"]),
        (
            "features",
            "read from the feature cache"
            if s["from_cache"]
            else f"extracted in {s['extract_seconds']:.1f} s",
        ),
        ("neighbour search", s["neighbours"]["backend"]),
    ]
    files = " · ".join(_link(f) for f in s["files"] if not f.endswith(".png"))
    return f"{_table(rows)}<p>Files: {files}</p>"


def _labels(s: dict) -> str:
    lab = s.get("labels")
    if not lab:
        return ""
    rows = [
        ("classes (folders)", lab["classes"]),
        ("groups' purity", f"{lab['purity']:.3f}"),
        ("adjusted Rand index, groups vs classes", f"{lab['ari']:.3f}"),
        (f"kNN top-1 (k = {lab['knn_k']}, leave-one-out)", f"{lab['knn_top1']:.3f}"),
    ]
    note = (
        "<p class='note'>Purity: the share of images whose class is their group's most common "
        "one. Adjusted Rand index: 1 when the groups are the classes, about 0 when they are no "
        "better than chance. kNN: each image classified by the votes of its nearest others "
        "(evaluate.py's classifier, temperature 0.07).</p>"
    )
    return f"<h2>Against the labels</h2>{_table(rows)}{note}"


def _neighbours(s: dict) -> str:
    n = s["neighbours"]
    out = [
        f"<h2>Nearest neighbours</h2><p>Each row: a query (framed) and its {n['k']} most "
        f"similar images by cosine similarity (under each). {_link(n['csv'])}</p>",
        _img(n["sheet"], "nearest neighbours"),
    ]
    for q in n.get("query_sheets", []):
        out.append(f"<h3>{_e(q['query'])}</h3>{_img(q['sheet'], 'neighbours of ' + q['query'])}")
    return "".join(out)


def _groups(s: dict) -> str:
    g = s["groups"]
    figures = "".join(
        f"<figure>{_img(sheet, f'group {i}')}<figcaption>group {i}: {size:,} images"
        f"</figcaption></figure>"
        for i, (sheet, size) in enumerate(zip(g["sheets"], g["sizes"], strict=True))
    )
    linked = f" Linked into {_e(g['linked_into'])}." if g.get("linked_into") else ""
    return (
        f"<h2>Groups</h2><p>k-means into {g['n']} groups; each sheet shows the images nearest "
        f"its group's centre. Every image's group and its distance to the centre: "
        f"{_link(g['csv'])}.{linked}</p><div class='groups'>{figures}</div>"
    )


def _duplicates(s: dict) -> str:
    d = s["duplicates"]
    text = (
        f"<h2>Near-duplicates</h2><p>{d['pairs']:,} pairs with cosine similarity ≥ "
        f"{d['threshold']}; "
    )
    if d["pairs"] > d["listed"]:
        text += f"the {d['listed']:,} most similar are listed in {_link(d['csv'])}.</p>"
    else:
        text += f"all listed in {_link(d['csv'])}.</p>"
    if d.get("sheet"):
        text += _img(d["sheet"], "most similar pairs")
    return text


def _map(s: dict) -> str:
    m = s["map"]
    share = " and ".join(f"{v:.0%}" for v in m["variance"])
    out = [
        f"<h2>Map</h2><p>PCA of the embeddings (the two axes hold {share} of the variance).</p>",
        _img(m["pca"], "PCA map"),
        _img(m["thumbnails"], "thumbnail map"),
    ]
    if m.get("tsne"):
        out.append(f"<p>t-SNE of {m['tsne_rows']:,} images.</p>{_img(m['tsne'], 't-SNE map')}")
    else:
        out.append("<p class='note'>t-SNE: install the explore extra (scikit-learn).</p>")
    return "".join(out)


def write_page(out: Path, summary: dict) -> Path:
    """Write ``out/index.html`` from an explorer summary (see :func:`explore`)."""
    body = "".join(
        [
            f"<h1>What {_e(summary['model']['source'])} sees in {_e(summary['folder'])}</h1>",
            _overview(summary),
            _labels(summary),
            _neighbours(summary),
            _groups(summary),
            _duplicates(summary),
            _map(summary),
        ]
    )
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>explore: {_e(summary['folder'])}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    return write_text_atomic(out / "index.html", page)


__all__ = ["write_page"]
