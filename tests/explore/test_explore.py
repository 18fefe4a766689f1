"""The explorer end to end on a tiny folder: every output's shape and columns, every image in
exactly one group (and one link), bad files listed, the feature cache reused, folders without
labels, and the mistakes a user makes as one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowres_ssl.cli_results import explore_main
from lowres_ssl.explore import default_groups, explore
from lowres_ssl.explore.maps import has_tsne
from lowres_ssl.explore.neighbours import backend

from .conftest import CLASSES, PER_CLASS, write_images

N = len(CLASSES) * PER_CLASS


def rows_of(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def explored(labeled, weights, tmp_path_factory):
    """One run of the script on the labeled folder, with a query image and links."""
    base = tmp_path_factory.mktemp("explored")
    query = base / "query.png"
    write_images(base, ["query.png"], seed=9)
    out, links = base / "out", base / "links"
    argv = [str(weights), str(labeled), "--out", str(out), "--groups", "4", "--k", "3",
            "--queries", "5", "--query", str(query), "--link-into", str(links),
            "--cache-dir", str(base / "cache"), "--num-workers", "0"]  # fmt: skip
    assert explore_main(argv) == 0
    return out, links, json.loads((out / "explore.json").read_text())


def test_embeddings_and_their_paths_cover_the_good_images(explored, labeled):
    out, _, summary = explored
    emb = np.load(out / "embeddings.npy")
    paths = (out / "paths.txt").read_text().splitlines()
    assert emb.shape == (N, 512) and emb.dtype == np.float32 and np.isfinite(emb).all()
    want = sorted(f"{c}/{i}.png" for c in CLASSES for i in range(PER_CLASS))
    assert sorted(paths) == want and all((labeled / p).is_file() for p in paths)
    assert summary["images"] == N and summary["features"] == 512


def test_bad_files_are_listed_not_fatal(explored):
    out, _, summary = explored
    listing = (out / "skipped_files.txt").read_text()
    assert "cat/broken.png" in listing and summary["skipped"] == 1


def test_clusters_put_every_image_in_exactly_one_group(explored):
    out, _, summary = explored
    header, rows = rows_of(out / "clusters.csv")
    assert header == ["path", "group", "distance", "class"]
    paths = (out / "paths.txt").read_text().splitlines()
    assert sorted(r["path"] for r in rows) == sorted(paths)  # each once
    assert {int(r["group"]) for r in rows} <= set(range(4))
    assert all(0 <= float(r["distance"]) <= 2 for r in rows)
    assert all(r["class"] == r["path"].split("/")[0] for r in rows)
    sizes = [sum(int(r["group"]) == g for r in rows) for g in range(4)]
    assert summary["groups"]["sizes"] == sizes and sizes == sorted(sizes, reverse=True)
    assert len(summary["groups"]["sheets"]) == 4
    for sheet in summary["groups"]["sheets"]:
        assert Image.open(out / sheet).size[0] > 100


def test_links_are_a_folder_per_group_with_every_image_once(explored, labeled):
    out, links, _ = explored
    _, rows = rows_of(out / "clusters.csv")
    made = sorted(p for p in links.rglob("*") if not p.is_dir())
    assert len(made) == N
    for r in rows:
        link = links / f"group_{int(r['group']):02d}" / r["path"].replace("/", "__")
        assert link.resolve() == (labeled / r["path"]).resolve()
        assert link.read_bytes() == (labeled / r["path"]).read_bytes()


def test_neighbour_sheets_and_csv(explored):
    out, _, summary = explored
    header, rows = rows_of(out / "neighbours.csv")
    assert header == ["query", "rank", "neighbour", "similarity"]
    assert len(rows) == 5 * 3 and {int(r["rank"]) for r in rows} == {1, 2, 3}
    assert all(r["query"] != r["neighbour"] for r in rows)  # never itself
    for q in {r["query"] for r in rows}:
        sims = [float(r["similarity"]) for r in rows if r["query"] == q]
        assert sims == sorted(sims, reverse=True)
    w, h = Image.open(out / "neighbours.png").size
    assert w >= 4 * 96 and h >= 5 * 96  # 5 rows of a query and 3 neighbours
    (made,) = summary["neighbours"]["query_sheets"]
    assert (out / made["sheet"]).is_file() and made["query"].endswith("query.png")
    assert summary["neighbours"]["backend"] == backend()


def test_duplicates_csv_and_the_map(explored):
    out, _, summary = explored
    header, rows = rows_of(out / "duplicates.csv")
    assert header == ["path_a", "path_b", "similarity"]
    assert len(rows) == summary["duplicates"]["listed"] <= summary["duplicates"]["pairs"]
    assert all(float(r["similarity"]) >= 0.95 and r["path_a"] < r["path_b"] for r in rows)
    assert Image.open(out / "map.png").size == (800, 700)
    assert Image.open(out / "map_thumbnails.png").size == (1400, 1400)
    assert (out / "map_tsne.png").is_file() == has_tsne()
    assert len(summary["map"]["variance"]) == 2 and sum(summary["map"]["variance"]) <= 1 + 1e-6


def test_with_labels_the_groups_are_scored_against_the_folders(explored):
    labels = explored[2]["labels"]
    assert labels["classes"] == 3 and labels["knn_k"] == 20 - 3  # capped at the 17 others
    assert -1 <= labels["ari"] <= 1 and 1 / 3 <= labels["purity"] <= 1
    assert 0 <= labels["knn_top1"] <= 1
    page = (explored[0] / "index.html").read_text()
    assert "adjusted Rand index" in page and "clusters.csv" in page


def test_a_second_run_reads_the_features_back_until_the_folder_changes(labeled, weights, tmp_path):
    common = dict(cache_dir=tmp_path / "cache", num_workers=0, tsne=False, groups=2)
    first = explore(str(weights), labeled, tmp_path / "a", **common)
    again = explore(str(weights), labeled, tmp_path / "b", **common)
    assert not first["from_cache"] and again["from_cache"]
    a, b = np.load(tmp_path / "a" / "embeddings.npy"), np.load(tmp_path / "b" / "embeddings.npy")
    assert np.array_equal(a, b)
    assert (tmp_path / "a" / "paths.txt").read_text() == (tmp_path / "b" / "paths.txt").read_text()
    changed = tmp_path / "changed"
    shutil.copytree(labeled, changed)
    write_images(changed / "dog", ["new.png"], seed=5)
    third = explore(str(weights), changed, tmp_path / "c", **common)
    assert not third["from_cache"] and third["images"] == N + 1


def test_a_folder_without_class_folders_has_no_labels(weights, tmp_path):
    folder = tmp_path / "loose"
    write_images(folder, [f"{i}.png" for i in range(9)], seed=1)
    write_images(folder / "more", [f"{i}.png" for i in range(4)], seed=2)
    (folder / "more" / "copy.png").write_bytes((folder / "3.png").read_bytes())
    s = explore(str(weights), folder, tmp_path / "out", cache_dir=tmp_path / "c",
                num_workers=0, tsne=False, duplicates=0.999)  # fmt: skip
    assert s["labels"] is None and s["images"] == 14
    assert s["groups"]["n"] == default_groups(14, 0) == 3
    header, _ = rows_of(tmp_path / "out" / "clusters.csv")
    assert header == ["path", "group", "distance"]
    _, pairs = rows_of(tmp_path / "out" / "duplicates.csv")
    assert {"3.png", "more/copy.png"} == {pairs[0]["path_a"], pairs[0]["path_b"]}
    assert float(pairs[0]["similarity"]) > 0.9999


def test_an_untrained_backbone_by_name(labeled, tmp_path):
    s = explore("resnet18", labeled, tmp_path / "out", size=16, cache_dir=tmp_path / "c",
                num_workers=0, tsne=False, labels="none")  # fmt: skip
    assert s["model"]["random_init"] and s["labels"] is None and s["images"] == N


def test_default_groups():
    assert default_groups(3929, 10) == 10
    assert default_groups(5000, 0) == 50 and default_groups(100_000, 0) == 100
    assert default_groups(3, 0) == 2 and default_groups(1, 0) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--link-into", "{full}"], "not an empty folder; pass a new or empty one"),
        (["--duplicates", "2"], "a cosine similarity is between -1 and 1"),
        (["--query", "{missing}"], "cannot use this image"),
        (["--groups", "0"], "--groups must be > 0"),
    ],
)
def test_mistakes_are_one_line_errors(labeled, weights, tmp_path, capsys, extra, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fill = {"{full}": str(full), "{missing}": str(tmp_path / "none.jpg")}
    argv = [str(weights), str(labeled), "--out", str(tmp_path / "o"), "--no-tsne",
            "--cache-dir", str(tmp_path / "c"), "--num-workers", "0"]  # fmt: skip
    argv += [fill.get(a, a) for a in extra]
    assert explore_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_a_model_that_is_neither_a_file_nor_a_name(labeled, tmp_path, capsys):
    assert explore_main(["runs/nothing", str(labeled), "--out", str(tmp_path / "o")]) == 2
    assert "runs/nothing does not exist" in capsys.readouterr().err


def test_the_seed_makes_a_run_repeatable(labeled, weights, tmp_path):
    """The same --seed draws the same queries and groups; another seed draws other queries."""
    common = ["--groups", "3", "--queries", "4", "--no-tsne", "--num-workers", "0",
              "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        argv = [str(weights), str(labeled), "--out", str(tmp_path / name), "--seed", seed]
        assert explore_main(argv + common) == 0
    read = {n: (tmp_path / n / "neighbours.csv").read_text() for n in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]
    clusters = [(tmp_path / n / "clusters.csv").read_text() for n in "ab"]
    assert clusters[0] == clusters[1]


def test_links_whose_flattened_names_collide_are_both_kept(weights, tmp_path):
    folder = tmp_path / "album"
    write_images(folder / "a", ["b__c.png"], seed=1)
    write_images(folder / "a__b", ["c.png"], seed=2)
    write_images(folder, ["d.png"], seed=3)
    s = explore(str(weights), folder, tmp_path / "out", groups=1, link_into=tmp_path / "links",
                cache_dir=tmp_path / "c", num_workers=0, tsne=False)  # fmt: skip
    links = sorted(p for p in (tmp_path / "links").rglob("*") if not p.is_dir())
    assert s["images"] == 3 and len(links) == 3
    assert {p.resolve() for p in links} == {p.resolve() for p in folder.rglob("*.png")}


def test_each_query_gets_its_own_neighbours(labeled, weights, tmp_path, monkeypatch):
    """Two --query images found in one search: each sheet's first neighbour is the folder's
    copy of that query (cosine 1), of its class."""
    import lowres_ssl.explore.explorer as explorer

    copies = []
    for c, i in (("cat", 0), ("eel", 2)):
        copies.append(tmp_path / f"{c}_copy.png")
        copies[-1].write_bytes((labeled / c / f"{i}.png").read_bytes())
    drawn = {}
    monkeypatch.setattr(
        explorer, "draw_sheet", lambda rows, path, **kw: drawn.setdefault(path.name, rows)
    )
    explore(str(weights), labeled, tmp_path / "out", query=[str(p) for p in copies], k=2,
            cache_dir=tmp_path / "c", num_workers=0, tsne=False)  # fmt: skip
    for n, c in enumerate(("cat", "eel")):
        (row,) = drawn[f"query_{n:02d}_{c}_copy.png"]
        similarity, label = row[1].caption.split("\n")
        assert float(similarity) > 0.9999 and label == c
