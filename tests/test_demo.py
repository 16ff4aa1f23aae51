import hashlib
import pytest

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from winnow.config import PoolParams
from winnow.demo import pool as demo
from winnow.pool import shards
from winnow.demo.world import Scene, render


def test_layout_is_datacomp(demo_pool):
    stems = shards.discover(str(demo_pool))
    assert stems == ["00000000", "00000001", "00000002"]
    for s in stems:
        for ext in ("tar", "parquet", "npz", "stats"):
            assert shards.path(str(demo_pool), s, ext).exists()
    t = pq.read_table(demo_pool / "00000000.parquet")
    assert t.column_names == shards.META_COLUMNS
    z = shards.read_npz(str(demo_pool), "00000000")
    assert {k: v.shape[1] for k, v in z.items()} == shards.EMBED_DIMS
    assert all(len(v) == t.num_rows for v in z.values())
    for v in z.values():
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-2)


def test_metadata_is_consistent(demo_pool):
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    assert meta.uid.is_unique and meta.uid.str.fullmatch(r"[0-9a-f]{32}").all()
    assert (meta.uid == [demo.uid_of(u, t) for u, t in zip(meta.url, meta.text)]).all()
    # the score column is the cosine of the npz features
    z = shards.read_npz(str(demo_pool), "00000000")
    m0 = meta.iloc[:200]
    np.testing.assert_allclose(np.einsum("nd,nd->n", z["b32_img"], z["b32_txt"]), m0.clip_b32_similarity_score, atol=1e-5)
    images = {s["json"]["uid"]: s["jpg"] for sh in shards.discover(str(demo_pool)) for s in shards.iter_tar(str(demo_pool), sh)}
    assert set(images) == set(meta.uid)
    assert all(hashlib.sha256(images[u]).hexdigest() == h for u, h in zip(meta.uid, meta.sha256))


def test_noise_kinds_labelled_and_realistic(demo_pool):
    truth = pd.read_parquet(demo_pool / "truth.parquet")
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    df = meta.merge(truth, on="uid")
    assert len(df) == 600 and set(df.kind) == set(demo.NOISE_KINDS)
    side = np.minimum(df.original_width, df.original_height)
    aspect = np.maximum(df.original_width, df.original_height) / side
    bad = (side < 200) | (aspect > 3)
    assert bad[df.kind == "bad_size"].all() and not bad[df.kind == "clean"].any()
    exact = df[df.kind == "exact_duplicate"]
    src = df.set_index("uid").loc[exact.duplicate_of]
    assert (exact.sha256.to_numpy() == src.sha256.to_numpy()).all()
    near = df[df.kind == "near_duplicate"]
    assert (near.sha256.to_numpy() != df.set_index("uid").loc[near.duplicate_of].sha256.to_numpy()).all()
    assert (df[df.kind == "non_english"].lang != "en").all()
    st = df[df.kind == "scene_text"]
    # a parrot caption says nothing but the image's text (DataComp's scene-text failure)
    words = st.text.str.lower().str.replace("!", "").str.split()
    extra = {"the", "a", "sign", "on", "wall", "that", "says", "word"}
    assert all(w in ws and set(ws) - {w} <= extra for w, ws in zip(st.scene_text, words))
    # OpenAI-CLIP-like: scene text scores high, mismatched low
    means = df.groupby("kind").clip_b32_similarity_score.mean()
    assert means["scene_text"] > means["clean"] > means["mismatched"]


def test_generation_is_deterministic(tmp_path):
    cfg = PoolParams(num_samples=80, shard_size=40, trusted_samples=20)
    a = demo.write_pool(cfg, 3, str(tmp_path / "a"))
    b = demo.write_pool(cfg, 3, str(tmp_path / "b"))
    assert a == b
    for name in ("00000000.parquet", "00000001.tar", "00000001.npz", "truth.parquet", "trusted/00000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = demo.write_pool(cfg, 4, str(tmp_path / "c"))
    assert (tmp_path / "a" / "00000000.parquet").read_bytes() != (tmp_path / "c" / "00000000.parquet").read_bytes()
    assert c["num_samples"] == 80


def test_render_draws_what_the_scene_says():
    rng = np.random.default_rng(0)
    img = np.asarray(render(Scene("square", "red", 1, "large", "white"), rng))
    red = (img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)
    assert red.mean() > 0.05


def test_the_pool_concepts_have_a_head_a_tail_and_off_task_shapes(tmp_path):
    """pool.concepts: the pool's (colour, shape) pairs follow rank^-zipf, and a share of its scenes
    show shapes no task asks about; with both 0 the pool is drawn as the tasks are."""
    from winnow.demo import world

    cfg = PoolParams(num_samples=3000, shard_size=1000, trusted_samples=10, noise={k: 0.0 for k in (
        "mismatched", "scene_text", "uninformative", "bad_size", "exact_duplicate", "near_duplicate")} | {"non_english": 0.1},
                     concepts={"zipf": 1.0, "off_task": 0.25})
    samples = demo.make_samples(cfg, 0)
    off = np.mean([s.scene.shape in world.OFF_TASK_SHAPES for s in samples])
    assert any(s.lang != "en" and s.scene.shape in world.OFF_TASK_SHAPES for s in samples)   # captioned in every language
    assert 0.2 < off < 0.3
    on = pd.Series([(s.scene.colour, s.scene.shape) for s in samples if s.scene.shape in world.SHAPES]).value_counts()
    c = world.Concepts(1.0, 0.25, 0)
    head, tail = c.pairs[0], c.pairs[-1]
    assert on.get(head, 0) > 10 * max(1, on.get(tail, 0)), "the head concept is an order of magnitude more common"
    assert on.get(head, 0) / on.sum() == pytest.approx(c.p[0], abs=0.03)
    uniform = demo.make_samples(cfg.model_copy(update={"concepts": cfg.concepts.model_copy(update={"zipf": 0.0, "off_task": 0.0})}), 0)
    assert not any(s.scene.shape in world.OFF_TASK_SHAPES for s in uniform)
    assert pd.Series([(s.scene.colour, s.scene.shape) for s in uniform]).value_counts().max() < 3 * len(uniform) / 48


def test_the_trusted_set_teaches_reading(tmp_path):
    """A share pool.trusted_signs of the scorer's trusted pairs are signs captioned with their text."""
    import webdataset as wds

    cfg = PoolParams(num_samples=10, shard_size=1000, trusted_samples=400, trusted_signs=0.4)
    demo.write_trusted(cfg, 0, str(tmp_path))
    caps = [s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "00000000.tar"), shardshuffle=False)]
    from winnow.demo import world

    signs = [c for c in caps if any(w in c.split() for w in world.SIGN_WORDS)]
    assert 0.3 < len(signs) / len(caps) < 0.5


def test_loose_captions_name_part_of_the_scene_and_are_marked_in_truth(tmp_path):
    """pool.loose_captions: that share of the clean pairs (and their duplicates) get alt text that
    names part of the scene among boilerplate, marked ``loose_caption`` in truth.parquet and scored
    lower by the simulated OpenAI CLIP; at 0 the pool is byte-identical to one without the knob."""
    from winnow.demo import world

    base = dict(num_samples=600, shard_size=600, trusted_samples=10)
    cfg = PoolParams(**base, loose_captions=0.5)
    demo.write_pool(cfg, 1, str(tmp_path / "loose"))
    truth = pd.read_parquet(tmp_path / "loose" / "truth.parquet")
    meta = pd.read_parquet(tmp_path / "loose" / "00000000.parquet").merge(truth, on="uid")
    cleanish = meta[meta.kind.isin(["clean", "bad_size"])]
    assert 0.35 < cleanish.loose_caption.mean() < 0.65
    for row in cleanish.itertuples():
        shown = {row.colour, world.PLURAL[row.shape]}
        words = set(row.text.replace(",", " ").split())
        if row.loose_caption:
            assert words & shown and not words & set(world.COUNT_WORDS) and row.background not in words - shown
        else:
            assert row.colour in words and (row.shape in words or world.PLURAL[row.shape] in words)
    dups = meta[meta.kind.isin(["exact_duplicate", "near_duplicate"])]
    src = meta.set_index("uid").loose_caption
    assert (dups.loose_caption == src.reindex(dups.duplicate_of).to_numpy()).all()
    assert not meta[~meta.kind.isin(["clean", "bad_size", "exact_duplicate", "near_duplicate"])].loose_caption.any()
    by = meta[meta.kind == "clean"].groupby("loose_caption").clip_b32_similarity_score.mean()
    assert by[True] < by[False] - 0.03
    demo.write_pool(PoolParams(**base), 1, str(tmp_path / "a"))
    demo.write_pool(PoolParams(**base, loose_captions=0.0), 1, str(tmp_path / "b"))
    for name in ("00000000.parquet", "00000000.tar", "00000000.npz", "truth.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "loose_caption" not in pd.read_parquet(tmp_path / "a" / "truth.parquet")


def test_text_on_objects_paints_sign_text_over_a_scene_of_objects(tmp_path):
    """pool.text_on_objects: that share of the scene-text images (and of the trusted signs) show the
    sign's text over a scene of objects, as web posters and product shots do, so an image-cluster
    filter cannot tell them from on-task pictures; their caption still only repeats the text. At 0
    the pool is byte-identical to one without the knob."""
    from winnow.demo import world

    base = dict(num_samples=800, shard_size=800, trusted_samples=300)
    demo.write_pool(PoolParams(**base, text_on_objects=0.75), 2, str(tmp_path / "on"))
    truth = pd.read_parquet(tmp_path / "on" / "truth.parquet")
    meta = pd.read_parquet(tmp_path / "on" / "00000000.parquet").merge(truth, on="uid")
    signs = meta[meta.kind == "scene_text"]
    on = signs[signs["count"] > 0]
    assert 0.6 < len(on) / len(signs) < 0.9
    assert on["shape"].notna().all() and on.on_task.any() and not signs[signs["count"] == 0].on_task.any()
    for row in signs.itertuples():   # the caption names the text, never the objects under it
        words = set(row.text.lower().replace("!", " ").split())
        assert row.scene_text in words and not words & (set(world.SHAPES) | set(world.PLURAL.values()) | set(world.COLOURS))
    # the image shows both: the objects' colour and the text's ink
    rng = np.random.default_rng(0)
    scene = world.Scene("star", "red", 3, "large", "white", text="sale")
    px = np.asarray(world.render(scene, rng)).reshape(-1, 3).astype(int)
    red = (np.abs(px - world.COLOURS["red"]).sum(1) < 60).mean()
    ink = (px.sum(1) < 80).mean()
    assert red > 0.05 and ink > 0.01
    demo.write_pool(PoolParams(**base), 2, str(tmp_path / "a"))
    demo.write_pool(PoolParams(**base, text_on_objects=0.0), 2, str(tmp_path / "b"))
    for name in ("00000000.parquet", "00000000.tar", "00000000.npz", "truth.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for sub in ("a", "b"):
        assert (tmp_path / sub / "trusted" / "00000000.tar").exists()
    assert (tmp_path / "a" / "trusted" / "00000000.tar").read_bytes() == (tmp_path / "b" / "trusted" / "00000000.tar").read_bytes()
