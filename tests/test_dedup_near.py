"""Near-duplicate removal by embedding cosine: the first of each group (pool order) stays, across
shards and blocks; quarantined (NaN) embeddings are never duplicates."""
import numpy as np

from tests.helpers import bench_module
from winnow.filters import build_step
from winnow.pool import shards
from winnow.pool.view import Pool


def test_near_duplicates_across_shards_and_blocks(tmp_path):
    bench_module("filter").generate(tmp_path, 300, 3, dim=16)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = {5: 120, 7: 250, 130: 131, 140: 299}            # original row -> later near copy
    for src, dst in copies.items():
        base[dst] = base[src] + 0.01 * rng.standard_normal(16)
    base[200] = np.nan                                         # a quarantined image
    for k in range(3):
        shards.write_npz(str(tmp_path), shards.stem(k), {"l14_img": base[k * 100:(k + 1) * 100],
                                                         "l14_txt": base[k * 100:(k + 1) * 100]})
    pool = Pool.open(str(tmp_path))
    step = build_step({"step": "dedup_near", "embedding": "l14_img", "threshold": 0.95, "block": 32}, "test")
    fitted = step.fit(pool, lambda shard: np.ones(100, bool))
    dropped = sorted(int(s) * 100 + r for s, rows in ((sh, fitted.rows.get(sh, [])) for sh in pool.shards)
                     for r in rows)
    assert dropped == sorted(copies.values())
    assert step.report(fitted) == {"unique_images": 300 - 4 - 1, "near_duplicates": 4}
    keep = np.concatenate([step.verdict(pool.batch(s), fitted) for s in pool.shards])
    assert keep.sum() == 296 and keep[200]
