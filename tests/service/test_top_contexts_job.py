"""The bulk job (jobs.top_contexts) against the served app, checked against a brute-force scan of the dataset
with TransformerLens + SAE Lens called directly on the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.top_contexts import OUTPUT_SCHEMA, extract_top_contexts, parse_features, summary
from tests import reference as R
from tests.compare import assert_same_answer

from .conftest import MODEL_ID

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5
LAYER = 1
SOURCE = f"{LAYER}-res-demo"
TOP = 5

SENTENCES = [
    "The cat sat on the mat.", "Dogs bark at night.", "She sells sea shells by the sea shore.",
    "The quick brown fox jumps over the lazy dog.", "It was raining in the city all day.",
    "He bought three apples and two pears.", "The meeting starts at nine o'clock.", "Birds fly south in the winter.",
    "My brother plays the guitar every evening.", "The river flows into the ocean.", "We walked to the park after lunch.",
    "A small boat drifted across the lake.", "The children laughed at the clown.", "Please close the door behind you.",
    "The sun rises in the east.", "They built a house near the forest.", "Coffee tastes better in the morning.",
    "The old man told a long story.", "Snow covered the mountains in December.", "I forgot my keys at home again.",
    "The train was late by twenty minutes.", "She wrote a letter to her grandmother.", "The garden is full of roses.",
    "Music filled the empty hall.", "The teacher asked a difficult question.", "Stars shine brightly in the desert.",
    "He fixed the broken chair with glue.", "The market opens early on Saturday.", "Water boils at one hundred degrees.",
    "The dog chased the ball down the street.", "Our team won the final game.", "The library closes at eight.",
    "Fresh bread smells wonderful.", "The wind blew the leaves away.", "She painted the fence bright blue.",
    "The computer crashed during the update.", "Two cats slept on the warm sofa.", "The bridge was closed for repairs.",
    "He ran five miles before breakfast.", "The soup needs more salt.", "Clouds gathered over the hills.",
    "The baby smiled at her mother.", "A loud noise woke everyone up.", "The shop sells old books and maps.",
    "They danced until midnight.", "The king lived in a tall castle.", "Rain fell softly on the roof.",
    "The students finished their exams.", "A green frog jumped into the pond.", "The phone rang twice and stopped.",
]
LONG = "word " * 200  # over the test app's token_limit of 64: skipped and counted


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("contexts")
    rows = [{"text": t, "id": i} for i, t in enumerate(SENTENCES)] + [{"text": LONG, "id": 50}, {"text": None, "id": 51}]
    jsonl = d / "contexts.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = d / "contexts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return {"jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="module")
def brute_force(pack_dir):
    """Per feature, every text's (max, first argmax, tokens, values) with BOS zeroed, by the reference."""
    per_text = []
    for t in SENTENCES:
        _, strs, feats = R.feature_acts(str(pack_dir), t, "res-demo", LAYER)
        feats = feats.clone()
        feats[0, :] = 0  # BOS
        per_text.append((t, strs, feats))
    return per_text


def want_top(brute_force, feature: int, top: int | None = None) -> list[dict]:
    rows = []
    for text, strs, feats in brute_force:
        col = feats[:, feature]
        mx = float(col.max())
        if mx > 0:
            at = int((col == col.max()).nonzero()[0, 0])
            rows.append(dict(activation=mx, text=text, token_index=at, tokens=strs, values=col.tolist()))
    rows.sort(key=lambda r: (-r["activation"], r["text"], r["token_index"]))
    return rows if top is None else rows[:top]


@pytest.fixture(scope="module")
def features(brute_force):
    """Three features that exercise the ranking: the one firing on most texts (more than TOP), one firing on
    fewer than TOP texts, and feature 0."""
    d_sae = brute_force[0][2].shape[1]
    fires = {f: len(want_top(brute_force, f)) for f in range(d_sae)}
    many = max(fires, key=lambda f: (fires[f], -f))
    few = next(f for f in range(d_sae) if 0 < fires[f] < TOP)
    assert fires[many] > TOP
    return [many, few, 0] if 0 not in (many, few) else [many, few]


@pytest.fixture(scope="module")
def handle(serve_app):
    from ray import serve

    return serve.get_app_handle("saeserve")


@pytest.fixture(scope="module")
def table(handle, dataset, features):
    return extract_top_contexts(handle, str(dataset["jsonl"]), SOURCE, features, TOP, batch_size=16, progress=False)


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-6)


def assert_same_contexts(a, b):
    """Two runs' tables, scored in other batches: per feature the same ranking up to float32 drift (near ties may
    swap texts, or change which one makes the cut; tests/compare.py)."""
    def row(r):  # a text's position of its maximum is an argmax: a near tie may move it (and the context with it)
        return {"feature": r["feature"], "text": r["text"], "source": r["source"], "tokens": r["tokens"],
                "values": r["values"], "max_value": r["activation"], "max_value_index": r["token_index"]}

    ra, rb = [row(r) for r in a.to_pylist()], [row(r) for r in b.to_pylist()]
    assert [r["feature"] for r in ra] == [r["feature"] for r in rb]
    for f in dict.fromkeys(r["feature"] for r in ra):
        assert_same_answer([r for r in ra if r["feature"] == f], [r for r in rb if r["feature"] == f])


def test_schema_and_summary(table, features):
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    s = summary(table)
    assert s == dict(model=MODEL_ID, source=SOURCE, features=features, top=TOP, n_texts=len(SENTENCES),
                     n_skipped_too_long=1, n_skipped_empty=1, n_rows=table.num_rows)
    feats = table.column("feature").to_pylist()
    assert sorted(set(feats), key=features.index) == [f for f in features if f in feats]
    assert feats == sorted(feats, key=features.index)  # grouped by feature, in the order asked


def test_top_contexts_equal_brute_force(table, brute_force, features):
    rows = table.to_pylist()
    for f in features:
        got = [r for r in rows if r["feature"] == f]
        full = want_top(brute_force, f)
        want = full[:TOP]
        assert len(got) == len(want), (f, len(got), len(want))
        assert [r["rank"] for r in got] == list(range(len(got)))
        for g, w in zip(got, want):
            assert close(g["activation"], w["activation"]), (f, g["rank"], g["activation"], w["activation"])
            if (g["text"], g["token_index"]) != (w["text"], w["token_index"]):
                # Only a near-tie may swap order: the text the job put here is at this value in the scan too.
                alt = next(x for x in full if x["text"] == g["text"])
                assert close(alt["activation"], w["activation"]), (f, g, w)
                # its position: the scan's argmax, or another position tied with it
                assert alt["token_index"] == g["token_index"] or close(alt["values"][g["token_index"]], alt["activation"])
                w = alt
            assert g["source"] == SOURCE
            assert g["tokens"] == w["tokens"]
            assert g["token"] == w["tokens"][g["token_index"]]
            assert all(close(a, b) for a, b in zip(g["values"], w["values"])) and len(g["values"]) == len(w["values"])
            assert g["values"][0] == 0.0 and close(max(g["values"]), g["activation"])
            ti = g["token_index"]
            assert g["context_left"] == "".join(g["tokens"][max(1, ti - 8):ti])
            assert g["context_right"] == "".join(g["tokens"][ti + 1:ti + 9])
        assert all(a["activation"] >= b["activation"] for a, b in zip(got, got[1:]))


def test_parquet_input_same_answer(handle, dataset, features, table):
    other = extract_top_contexts(handle, str(dataset["parquet"]), SOURCE, features, TOP, batch_size=7, concurrency=2,
                                 progress=False)
    assert_same_contexts(other, table)


def test_bad_arguments(handle, dataset):
    with pytest.raises(ValueError, match="Invalid SAE ID or type: 9-res-demo"):
        extract_top_contexts(handle, str(dataset["jsonl"]), "9-res-demo", [0])
    with pytest.raises(ValueError, match="out of range"):
        extract_top_contexts(handle, str(dataset["jsonl"]), SOURCE, [0, 10**6])
    with pytest.raises(ValueError, match="no 'body' column"):
        extract_top_contexts(handle, str(dataset["jsonl"]), SOURCE, [0], text_column="body")
    with pytest.raises(ValueError, match="no such file"):
        extract_top_contexts(handle, str(dataset["jsonl"].parent / "missing.jsonl"), SOURCE, [0])
    odd = dataset["jsonl"].parent / "contexts.txt"
    odd.write_text(dataset["jsonl"].read_text())
    with pytest.raises(ValueError, match="--format"):
        extract_top_contexts(handle, str(odd), SOURCE, [0])
    assert parse_features("3, 1,5-7,3") == [3, 1, 5, 6, 7]


def test_cli_as_a_separate_driver(ray_session, serve_app, dataset, features, table, tmp_path):
    """`python -m jobs.top_contexts ...` as a driver of its own on the running cluster (what `ray job submit`
    runs), writing the same Parquet as the in-session call."""
    out = tmp_path / "top.parquet"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.top_contexts", "--app", "saeserve", "--dataset", str(dataset["jsonl"]), "--source", SOURCE,
         "--features", ",".join(map(str, features)), "--top", str(TOP), "--out", str(out), "--address", address,
         "--batch-size", "16", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(SENTENCES)} texts scored, 1 skipped as too long, 1 null" in proc.stdout
    written = pq.read_table(out)
    assert summary(written) == summary(table)
    assert_same_contexts(written, table)


def test_cli_help_lists_the_manifest_flags():
    proc = subprocess.run([sys.executable, "-m", "jobs.top_contexts", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--app", "--dataset", "--source", "--features", "--top", "--out", "--model", "--batch-size", "--concurrency"):
        assert flag in proc.stdout
