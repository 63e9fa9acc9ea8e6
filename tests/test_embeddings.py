"""--embeddings: the pooled features (EfficientNet-Lite0: 1280) from the same forward pass as the
labels, L2-normalized, stored as a float16 fixed-size list; on LiteRT and Keras, local and Ray.
The README's nearest-neighbour and near-duplicate DuckDB queries run here as written there."""
import importlib.util
import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from conftest import read_summary

WIDTH = 1280

# The README's queries (keep them identical); {out}, {image_id} and {threshold} filled in.
CURRENT = """WITH current AS (
  SELECT * FROM read_parquet('{out}/part-*.parquet', union_by_name = true)
  QUALIFY row_number() OVER (PARTITION BY image_id, model ORDER BY labeled_at DESC) = 1),
e AS (SELECT image_id, embedding::FLOAT[1280] AS v FROM current
      WHERE model = 'efficientnet_lite0' AND embedding IS NOT NULL)
"""
NEAREST = CURRENT + """SELECT b.image_id, array_cosine_similarity(a.v, b.v) AS similarity
FROM e AS a, e AS b
WHERE a.image_id = '{image_id}' AND b.image_id <> a.image_id
ORDER BY similarity DESC LIMIT 10"""
NEAR_DUPLICATES = CURRENT + """SELECT a.image_id, b.image_id AS other, array_cosine_similarity(a.v, b.v) AS similarity
FROM e AS a JOIN e AS b ON a.image_id < b.image_id
WHERE array_cosine_similarity(a.v, b.v) > {threshold}
ORDER BY similarity DESC"""
THRESHOLD = 0.7


def rows_by_id(out):
    return {r["image_id"]: r for r in pipeline.latest(str(out)).to_pylist()}


def vectors(rows) -> dict[str, np.ndarray]:
    return {i: np.asarray(r["embedding"], np.float32) for i, r in rows.items()
            if r["embedding"] is not None}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos_dir):
    d = tmp_path_factory.mktemp("emb") / "in"
    shutil.copytree(photos_dir, d)
    (d / "broken.jpg").write_bytes((d / "chelsea.jpg").read_bytes()[:2000])  # corrupt
    return d


@pytest.fixture(scope="module")
def embedded(cli, inputs, tmp_path_factory):
    """The same photos with --embeddings on LiteRT (the CPU default) and on Keras."""
    outs = {}
    for runtime in ("litert", "keras"):
        out = tmp_path_factory.mktemp("emb") / runtime
        proc = cli("label", inputs, out, "--embeddings", "--runtime", runtime, "--json",
                   "--max-error-rate", "1")
        assert proc.returncode == 0, proc.stderr
        outs[runtime] = out
    return outs


def test_embedding_column_is_unit_float16_and_null_for_errors(embedded):
    part = next(embedded["litert"].glob("part-*.parquet"))
    field = pq.read_schema(part).field("embedding")
    assert str(field.type) == f"fixed_size_list<element: halffloat>[{WIDTH}]"
    rows = rows_by_id(embedded["litert"])
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["embedding"] is None
    vecs = vectors(rows)
    assert len(vecs) == 5
    for image_id, v in vecs.items():
        assert v.shape == (WIDTH,)
        assert abs(np.linalg.norm(v) - 1) < 2e-3, image_id  # float16 rounding only
        assert (v >= 0).all()  # pooled ReLU6 features


def test_litert_and_keras_embeddings_agree(embedded):
    lite, keras = vectors(rows_by_id(embedded["litert"])), vectors(rows_by_id(embedded["keras"]))
    assert set(lite) == set(keras)
    cosines = {i: float(lite[i] @ keras[i] / np.linalg.norm(lite[i]) / np.linalg.norm(keras[i]))
               for i in lite}
    print("LiteRT vs Keras cosine:", cosines)
    assert min(cosines.values()) > 0.999
    # a different photo is far from it: the agreement is not of two constant vectors
    assert float(lite["chelsea.jpg"] @ keras["png/coffee.PNG"]) < 0.9


def test_labels_are_those_of_a_run_without_embeddings(cli, embedded, inputs, tmp_path):
    out = tmp_path / "plain"
    assert cli("label", inputs, out, "--max-error-rate", "1").returncode == 0
    plain, with_embeddings = rows_by_id(out), rows_by_id(embedded["litert"])
    assert "embedding" not in pq.read_schema(next(out.glob("part-*.parquet"))).names
    for image_id, row in plain.items():
        assert row["label_ids"] == with_embeddings[image_id]["label_ids"], image_id
        if row["scores"]:
            np.testing.assert_allclose(row["scores"], with_embeddings[image_id]["scores"],
                                       atol=1e-5)


def test_readme_queries_nearest_neighbours_and_near_duplicates(embedded, inputs, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = embedded["litert"]
    nearest = duckdb.sql(NEAREST.format(out=out, image_id="chelsea.jpg")).fetchall()
    assert len(nearest) == 4 and "chelsea.jpg" not in [i for i, _ in nearest]
    vecs = vectors(rows_by_id(out))
    expected = sorted(((i, float(vecs["chelsea.jpg"] @ v)) for i, v in vecs.items()
                       if i != "chelsea.jpg"), key=lambda p: -p[1])
    assert [i for i, _ in nearest] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in nearest], [s for _, s in expected], atol=1e-3)
    assert duckdb.sql(NEAR_DUPLICATES.format(out=out, threshold=THRESHOLD)).fetchall() == []


def test_near_duplicate_query_finds_a_resized_copy(cli, inputs, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    from PIL import Image

    src = tmp_path / "in"
    shutil.copytree(inputs, src)
    with Image.open(src / "chelsea.jpg") as im:
        im.resize((im.width // 2, im.height // 2), Image.BICUBIC).save(src / "small-cat.jpg",
                                                                      quality=90)
    out = tmp_path / "out"
    assert cli("label", src, out, "--embeddings", "--max-error-rate", "1").returncode == 0
    pairs = duckdb.sql(NEAR_DUPLICATES.format(out=out, threshold=THRESHOLD)).fetchall()
    assert [(a, b) for a, b, _ in pairs] == [("chelsea.jpg", "small-cat.jpg")], pairs


def test_embeddings_fill_an_output_labeled_without_them(cli, inputs, tmp_path):
    """--embeddings asks for more: rows labeled without are labeled again (permanent errors
    are not); a run without --embeddings then takes the rows that have them as done."""
    out = tmp_path / "out"
    first = read_summary(cli("label", inputs, out, "--json", "--max-error-rate", "1"))
    assert (first["labeled"], first["errors"]) == (5, 1)

    proc = cli("label", inputs, out, "--embeddings", "--json", "--max-error-rate", "1")
    assert proc.returncode == 0, proc.stderr
    second = read_summary(proc)
    assert (second["labeled"], second["skipped"], second["errors"]) == (5, 1, 0)
    rows = rows_by_id(out)
    assert len(vectors(rows)) == 5 and rows["broken.jpg"]["embedding"] is None

    again = read_summary(cli("label", inputs, out, "--embeddings", "--json"))
    assert (again["labeled"], again["skipped"]) == (0, 6)
    plain = read_summary(cli("label", inputs, out, "--json"))
    assert (plain["labeled"], plain["skipped"]) == (0, 6)

    # parts with and without the column compact into one current row per image, embeddings kept
    before = vectors(rows)
    proc = cli("compact", out)
    assert proc.returncode == 0, proc.stderr
    after = rows_by_id(out)
    assert len(after) == 6 and vectors(after).keys() == before.keys()
    for image_id, v in vectors(after).items():
        np.testing.assert_array_equal(v, before[image_id])
    assert read_summary(cli("label", inputs, out, "--embeddings", "--json"))["labeled"] == 0


def test_embeddings_key_in_a_config_file_is_validated(cli, inputs, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('embeddings = "yes"\n')
    proc = cli("label", inputs, tmp_path / "out", "--config", bad)
    assert proc.returncode == 2 and "embeddings" in proc.stderr
    good = tmp_path / "good.toml"
    good.write_text("embeddings = true\nmax_error_rate = 1.0\n")
    proc = cli("label", inputs, tmp_path / "out", "--config", good, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(vectors(rows_by_id(tmp_path / "out"))) == 5


def _tiny_model(head: str):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if head == "dense":
        x = keras.layers.Dropout(0.2)(x)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    x = keras.layers.Dense(3)(x)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(x))


def test_custom_model_embeddings_are_its_classifier_input_or_exit_2(cli, inputs, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    good, bad = tmp_path / "dense_head.keras", tmp_path / "activation_head.keras"
    _tiny_model("dense").save(good)
    _tiny_model("activation").save(bad)
    custom = ["--labels", labels, "--preprocess", "tf", "--max-error-rate", "1", "--json"]
    proc = cli("label", inputs, tmp_path / "good", "--model", good, "--embeddings", *custom)
    assert proc.returncode == 0, proc.stderr
    vecs = vectors(rows_by_id(tmp_path / "good"))
    assert len(vecs) == 5 and all(v.shape == (8,) for v in vecs.values())  # the pooled 8
    proc = cli("label", inputs, tmp_path / "bad", "--model", bad, "--embeddings", *custom)
    assert proc.returncode == 2
    assert "activation_head.keras" in proc.stderr and "Dense classifier" in proc.stderr
    assert not (tmp_path / "bad").exists()  # stopped before OUTPUT was touched
    # without --embeddings that model labels as before
    proc = cli("label", inputs, tmp_path / "bad", "--model", bad, *custom)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_engine_rows_have_the_local_embeddings(cli, embedded, inputs, tmp_path):
    out = tmp_path / "ray"
    proc = cli("label", inputs, out, "--engine", "ray", "--runtime", "keras", "--embeddings",
               "--json", "--progress", "none", "--max-error-rate", "1", timeout=900)
    assert proc.returncode == 0, proc.stderr
    ray_rows, local = rows_by_id(out), vectors(rows_by_id(embedded["keras"]))
    assert ray_rows["broken.jpg"]["embedding"] is None
    ray = vectors(ray_rows)
    assert ray.keys() == local.keys()
    for image_id, v in ray.items():
        assert float(v @ local[image_id]) > 0.999, image_id


# -- accuracy-style, on the shared ImageNet sample ---------------------------------------------

def _jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_resized_and_reencoded_copies_find_their_original(cli, shared_images, cache_home,
                                                          tmp_path):
    """100 shared photos plus a 0.5x resized copy of 5 of them and a JPEG q60 copy of 5 others:
    each copy's nearest neighbour (itself excluded) is its original, and the README's threshold
    separates copies from different photos. Also measures the float16 loss."""
    duckdb = pytest.importorskip("duckdb")
    from PIL import Image

    src = tmp_path / "in"
    shutil.copytree(shared_images, src)
    copies = {}
    for i, name in enumerate(sorted(p.name for p in src.iterdir())[::10]):
        with Image.open(src / name) as im:
            im = im.convert("RGB")
            if i % 2:
                copy, data = f"copy-q60-{name}.jpg", _jpeg(im, 60)
            else:
                half = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
                copy, data = f"copy-half-{name}.jpg", _jpeg(half, 90)
        (src / copy).write_bytes(data)
        copies[copy] = name
    out = tmp_path / "out"
    proc = cli("label", src, out, "--embeddings", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(proc)["labeled"] == 100 + len(copies)

    found, similarity = {}, {}
    for copy in copies:
        nearest = duckdb.sql(NEAREST.format(out=out, image_id=copy)).fetchall()
        found[copy], similarity[copy] = nearest[0]
    print("copy -> nearest (cosine):", {c: (found[c], round(similarity[c], 4)) for c in copies})
    assert found == copies
    pairs = duckdb.sql(NEAR_DUPLICATES.format(out=out, threshold=-1)).fetchall()
    unrelated = max(s for a, b, s in pairs if copies.get(a) != b and copies.get(b) != a)
    print(f"copy vs its original: min cosine {min(similarity.values()):.4f}; "
          f"two different photos: max cosine {unrelated:.4f}")
    assert min(similarity.values()) > THRESHOLD > unrelated
    pairs = duckdb.sql(NEAR_DUPLICATES.format(out=out, threshold=THRESHOLD)).fetchall()
    assert sorted((a, b) for a, b, _ in pairs) == sorted(
        tuple(sorted((c, o))) for c, o in copies.items())

    _measure_float16_loss(src, str(cache_home / "pipeline"))


def _measure_float16_loss(src, cache_dir: str):
    """float16 storage vs the float32 features of the same (Keras) forward pass."""
    from pipeline import devices, models, runtime
    from pipeline.models.features import with_embeddings
    from pipeline.reader import ImageReader
    from pipeline.sources import iter_refs
    from pipeline.types import DeviceRequest, ModelRequest

    spec = with_embeddings(models.get(ModelRequest(cache_dir=cache_dir)))
    request = DeviceRequest(runtime="keras", cache_dir=cache_dir)
    predictor = runtime.load(spec, devices.plan(request, []))
    exact = {}
    for batch in ImageReader(iter_refs(str(src)), spec.preprocess, 32):
        _, feats = predictor.predict_with_features(batch.images)
        exact.update(zip([r.image_id for r in batch.refs], runtime.l2_normalized(feats)))
    stored16 = {i: v.astype(np.float16).astype(np.float32) for i, v in exact.items()}
    worst_abs = max(float(np.abs(stored16[i] - exact[i]).max()) for i in exact)
    worst_cos = max(1 - float(stored16[i] @ exact[i] / np.linalg.norm(stored16[i]))
                    for i in exact)
    print(f"float16 storage over {len(exact)} photos: max abs error {worst_abs:.2e}, "
          f"max cosine error {worst_cos:.2e}")
    assert worst_abs < 1e-3 and worst_cos < 1e-5


def test_embeddings_with_int8_is_a_usage_error_before_output_is_touched(cli, inputs, tmp_path):
    proc = cli("label", inputs, tmp_path / "out", "--embeddings", "--precision", "int8")
    assert proc.returncode == 2 and "--precision int8" in proc.stderr
    assert not (tmp_path / "out").exists()
