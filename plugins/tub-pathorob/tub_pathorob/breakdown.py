"""Where the non-robustness comes from: the RI decomposed by query class, query center, center pair
and slide (an explanation of the pooled counts of Kömen et al., arXiv 2507.17845, not a new metric).

* per class / per center: SS, SO, OS, OO fractions of the first k neighbours of the queries of that
  class (center), and their RI = SO/(SO+OS) (the reference's ``calculate_fractions_per_cat``);
* center pairs: for centers (a, b), RI_ab = (SO_a→b + SO_b→a) / (SO_a→b + SO_b→a + OS_a + OS_b), where
  SO_a→b counts same-class neighbours from b of queries from a and OS_a other-class neighbours from
  a itself — low values mark the pairs whose tiles cluster by center; and the same-class neighbour
  composition matrix (share of a's same-class neighbours that come from b);
* slides: the share of OS neighbours (other class, same center) of each slide's tiles.
"""

from __future__ import annotations

import numpy as np

from .robustness_index import RobustnessResult

CATS = ("SS", "SO", "OS", "OO")


def _fractions(counts: np.ndarray) -> dict:
    tot = counts.sum()
    d = {c: float(counts[i] / tot) for i, c in enumerate(CATS)}
    so, os_ = counts[1], counts[2]
    d["robustness_index"] = float(so / (so + os_)) if so + os_ else float("nan")
    d["n_queries"] = 0
    return d


def breakdown(result: RobustnessResult, k: int, top: int = 20) -> dict:
    meta = result.meta
    per_class: dict[str, np.ndarray] = {}
    per_center: dict[str, np.ndarray] = {}
    n_class: dict[str, int] = {}
    n_center: dict[str, int] = {}
    centers_all = sorted(set(meta.medical_center))
    cpos = {c: i for i, c in enumerate(centers_all)}
    C = len(centers_all)
    same_to = np.zeros((C, C))   # same-class neighbours of a-queries from b
    other_to = np.zeros((C, C))  # other-class neighbours of a-queries from b
    slide_os: dict[str, list] = {}
    for _, rows, ns in result.sets:
        sub = meta.take(rows)
        nb = ns.neighbours[:, :k]
        sb = ns.bio[nb] == ns.bio[:, None]
        sc = ns.center[nb] == ns.center[:, None]
        q = np.stack([(sb & sc).sum(1), (sb & ~sc).sum(1), (~sb & sc).sum(1), (~sb & ~sc).sum(1)], 1)
        cls, cen, sld = sub.biological_class, sub.medical_center, sub.slide_id
        for name in np.unique(cls):
            m = cls == name
            per_class[name] = per_class.get(name, 0) + q[m].sum(0)
            n_class[name] = n_class.get(name, 0) + int(m.sum())
        for name in np.unique(cen):
            m = cen == name
            per_center[name] = per_center.get(name, 0) + q[m].sum(0)
            n_center[name] = n_center.get(name, 0) + int(m.sum())
        # center pairs, in global center positions
        local_names = np.unique(cen)  # ns.center codes follow sorted names of this set
        g = np.array([cpos[c] for c in local_names])
        qa = g[ns.center]                  # (n,)
        nbc = g[ns.center[nb]]             # (n, k)
        np.add.at(same_to, (np.repeat(qa, k), nbc.ravel()), sb.ravel().astype(float))
        np.add.at(other_to, (np.repeat(qa, k), nbc.ravel()), (~sb).ravel().astype(float))
        for s in np.unique(sld):
            m = sld == s
            e = slide_os.setdefault(s, [0, 0, cen[m][0], cls[m][0]])
            e[0] += int(q[m, 2].sum())
            e[1] += int(q[m].sum())
    out_class = {}
    for name, c in per_class.items():
        out_class[name] = _fractions(np.asarray(c)) | {"n_queries": n_class[name]}
    out_center = {}
    for name, c in per_center.items():
        out_center[name] = _fractions(np.asarray(c)) | {"n_queries": n_center[name]}
    pairs = []
    for i in range(C):
        for j in range(i + 1, C):
            so = same_to[i, j] + same_to[j, i]
            os_ = other_to[i, i] + other_to[j, j]
            if so + os_ > 0:
                pairs.append({"center_a": centers_all[i], "center_b": centers_all[j],
                              "robustness_index": float(so / (so + os_)), "SO": int(so), "OS": int(os_)})
    pairs.sort(key=lambda p: p["robustness_index"])
    with np.errstate(invalid="ignore"):
        composition = same_to / same_to.sum(1, keepdims=True)
    slides = [{"slide_id": s, "medical_center": v[2], "biological_class": v[3], "OS_share": v[0] / v[1] if v[1] else 0.0,
               "neighbours": v[1]} for s, v in slide_os.items()]
    slides.sort(key=lambda r: -r["OS_share"])
    return {
        "k": k,
        "per_class": out_class,
        "per_center": out_center,
        "center_pairs": pairs,
        "same_class_neighbour_composition": {"centers": centers_all, "matrix": np.nan_to_num(composition).tolist()},
        "most_confounded_slides": slides[:top],
        "all_slides": slides,
    }
