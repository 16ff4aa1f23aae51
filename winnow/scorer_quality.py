"""How good is a scoring CLIP? Separation of matched vs mismatched pairs, and how it ranks
scene-text pairs with and without flipping the image."""
from __future__ import annotations

import numpy as np
import torch
from PIL import ImageOps
from sklearn.metrics import roc_auc_score


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > a random negative), ties counted half."""
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def pair_scores(model, preprocess, tokenizer, pairs, flip: bool = False, batch_size: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            imgs = torch.stack([preprocess(ImageOps.mirror(p[0]) if flip else p[0]) for p in chunk])
            fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
            ft = torch.nn.functional.normalize(model.encode_text(tokenizer([p[1] for p in chunk])).float(), dim=-1)
            out.append((fi * ft).sum(-1).numpy())
    return np.concatenate(out)


def scorer_quality(model, preprocess, tokenizer, pairs) -> dict:
    kinds = np.array([p[2] for p in pairs])
    s = pair_scores(model, preprocess, tokenizer, pairs)
    sf = pair_scores(model, preprocess, tokenizer, pairs, flip=True)
    matched, mismatched, text = s[kinds == "matched"], s[kinds == "mismatched"], s[kinds == "scene_text"]
    return {
        "auc_matched_vs_mismatched": roc_auc(matched, mismatched),
        "mean_score_matched": float(matched.mean()), "mean_score_mismatched": float(mismatched.mean()),
        "mean_score_scene_text": float(text.mean()) if len(text) else None,
        "mean_flip_score_scene_text": float(sf[kinds == "scene_text"].mean()) if len(text) else None,
        "auc_matched_vs_scene_text": roc_auc(matched, text) if len(text) else None,
        "auc_matched_vs_scene_text_flipped": roc_auc(sf[kinds == "matched"], sf[kinds == "scene_text"]) if len(text) else None,
        "pairs": int(len(pairs)),
    }
