"""The ``explain`` verb's pipeline: per-tile maps (rollout, CP-LRP or AttnLRP) written as ``.npy`` + PNG overlays."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from tubcli.errors import TubError

from .embedding import MANIFEST_FIELDS, absolute_origin, atomic_dir, write_manifest
from .encoder import Encoder, uint8_to_float
from .lrp import lrp, make_target, patch_map
from .overlay import colour_range, overlay, save_png
from .rollout import attention_rollout
from .tiles import read_image, read_input, say_exif_rotated


def build_target(encoder: Encoder, cfg, device, info: dict | None = None, log=None):
    """The LRP target and what it explains in words. ``info``: this encoder's settings (``load_encoder``),
    which a probe's recorded encoder must match (``check_probe_encoder``)."""
    if cfg.target == "dim":
        if cfg.index >= encoder.dim:
            raise TubError(f"--index {cfg.index} is outside the embedding (dim {encoder.dim})")
        return make_target("dim", cfg.index), f"embedding dimension {cfg.index}"
    if cfg.target == "probe":
        if cfg.probe is None:
            raise TubError("--target probe needs --probe probe.safetensors (from 'tub atlas evaluate')")
        from tubcli.io import load_safetensors

        tensors, _ = load_safetensors(cfg.probe)  # an unreadable file is the error, before any warning about it
        W, b = tensors.get("weight"), tensors.get("bias")
        if W is None or b is None or W.ndim != 2:
            raise TubError(f"{cfg.probe} is not a linear probe (tensors 'weight' and 'bias' from 'tub atlas evaluate')")
        record = read_probe_record(Path(cfg.probe), log)
        recorded = record.get("encoder")
        if info is not None and recorded:
            check_probe_encoder(Path(cfg.probe), recorded, info, log)
        elif log is not None:
            log.warning("%s records no encoder (an older evaluate, or features from outside 'tub atlas embed'): "
                        "its --arch/--pool cannot be checked against this encoder's", cfg.probe)
        if W.shape[1] != encoder.dim:
            pool = f" (pool {recorded['pool']}, arch {recorded['arch']})" if recorded else ""
            raise TubError(f"{cfg.probe} expects {W.shape[1]}-dim features{pool}, but this encoder gives "
                           f"{encoder.dim} (pool {info['pool'] if info else encoder.pool}); pass the --arch, "
                           "--weights and --pool of the embed run the probe was trained on")
        classes = record.get("classes") or [str(i) for i in range(W.shape[0])]
        if cfg.index >= W.shape[0]:
            raise TubError(f"--index {cfg.index}: the probe has {W.shape[0]} classes ("
                           f"{', '.join(f'{i} = {c}' for i, c in enumerate(classes))})")
        name = classes[cfg.index] if len(classes) == W.shape[0] else str(cfg.index)
        return (make_target("probe", cfg.index, probe=(W.to(device), b.to(device))),
                f"probe class {name!r} (index {cfg.index})", name)
    if cfg.reference is None:
        raise TubError("--target similarity needs --reference TILE.png")
    ref = uint8_to_float(read_image(Path(cfg.reference))[None]).to(device)
    with torch.no_grad():
        e = encoder(ref)[0]
    return make_target("similarity", reference=e), f"similarity to {Path(cfg.reference).name}"


def read_probe_record(probe: Path, log=None) -> dict:
    """``probe.json`` beside ``probe.safetensors`` (classes, dim, encoder); {} (with a warning) without one."""
    from tubcli.io import read_json

    path = probe.with_suffix(".json")
    if not path.is_file():
        if log is not None:
            log.warning("no %s beside the probe: its class names and encoder are unknown", path.name)
        return {}
    record = read_json(path)
    return record if isinstance(record, dict) else {}


def check_probe_encoder(probe: Path, recorded: dict, info: dict, log=None) -> None:
    """A probe learnt on one encoder's features explains nothing on another's, even at the same width
    (CLS vs mean-pooled tokens): a different pooling or architecture is an error, other weights or
    preprocessing a warning (weights compared by their sha256 where the embed run recorded it, else by path)."""
    import os

    run = f" (embed run {recorded['embed_run']})" if recorded.get("embed_run") else ""
    for key, flag in (("pool", "--pool"), ("arch", "--arch")):
        want, have = recorded.get(key), info.get(key)
        if key == "arch" and "auto" in (want, have):  # no preset name to compare: the weights say more
            continue
        if want is not None and have is not None and want != have:
            raise TubError(f"{probe} was trained on {key} {want!r} features{run}, but this explain uses {key} "
                           f"{have!r}; pass {flag} {want} (and the embed run's --weights)")
    if log is None:
        return
    want, have = recorded.get("weights"), info.get("weights")
    if recorded.get("random_init") or info.get("random_init"):
        same = recorded.get("random_init") == info.get("random_init") and want == have
    elif recorded.get("weights_sha256") and info.get("weights_sha256"):  # the bytes decide: a copy is the same model
        same = info["weights_sha256"] == recorded["weights_sha256"]
    else:
        same = want is None or os.path.realpath(want) == os.path.realpath(os.path.abspath(have))
    if not same:
        log.warning("%s was trained on features of the weights %s, this explain uses %s: check they are the same "
                    "model", probe, want, have)
    if recorded.get("transform") and info.get("transform") and recorded["transform"] != info["transform"]:
        log.warning("%s was trained on features preprocessed as %s, this explain preprocesses as %s", probe,
                    recorded["transform"], info["transform"])


def tiling_flags(cfg) -> str:
    """The options an explain run tiles whole slides by, in words."""
    if cfg.slide_coords is not None:
        return f"--slide-coords {cfg.slide_coords}"
    how = f"--slide-mpp {cfg.slide_mpp:g}" if cfg.slide_mpp is not None else \
        f"--slide-mag {cfg.slide_mag:g}" if cfg.slide_mag is not None else f"--slide-level {cfg.slide_level}"
    return f"{how}, --slide-tile-size {cfg.slide_tile_size}"


def probe_tiling_differs(trained: dict, mpp: float | None, tile_px: int, flags: str = "explain's settings",
                         tolerance: float = 0.05) -> str | None:
    """How the tiling of an explained slide (``mpp`` µm/px, ``tile_px`` px, by ``flags``) differs from the
    one the probe's embeddings record (probe.json ``tiling``, written by ``evaluate``), in words; None when
    it does not, or cannot be told (an older probe.json, a slide or embeddings without a resolution). µm/px agree within
    ``tolerance`` (as --slide-mpp reads a scan up to 5% off), or within the recorded range of a mixed cohort."""
    if not isinstance(trained, dict):
        return None
    want_mpp, want_px = trained.get("target_mpp"), trained.get("tile_px")
    lo, hi = trained.get("target_mpp_range") or (want_mpp, want_mpp)
    pxs = trained.get("tile_px_values") or ([want_px] if want_px else [])
    off_mpp = bool(mpp and want_mpp) and not lo * (1 - tolerance) <= mpp <= hi * (1 + tolerance)
    off_px = bool(pxs) and tile_px not in pxs
    if not (off_mpp or off_px):
        return None
    want = " and ".join(([f"{lo:.4g}-{hi:.4g} µm/px" if lo != hi else f"{want_mpp:.4g} µm/px"] if want_mpp else [])
                        + ([f"{'/'.join(map(str, pxs))}-px tiles"] if pxs else []))
    have = " and ".join(([f"{mpp:.4g} µm/px"] if mpp and want_mpp else []) + ([f"{tile_px}-px tiles"] if pxs else []))
    return f"tiled at {have} ({flags}), but the probe was trained on embeddings of {want}"


LRP_RULES = {"lrp": "cp", "attnlrp": "attn"}  # --method -> lrp.lrp_rules rule set


def patch_relevance(encoder: Encoder, x01: torch.Tensor, method: str, target=None, head_fusion: str = "mean"):
    """One tile (1, 3, H, W) in [0, 1] -> ((H/P, W/P) map, signed, conservation rel. error or None).

    ``rollout``: CLS attention flow (class-agnostic, >= 0); ``lrp`` / ``attnlrp``: relevance of
    ``target`` summed per patch, with the relative error of its balance (see ``lrp.relevance_budget``).
    """
    if method == "rollout":
        with torch.no_grad():
            xn = encoder.preprocess(x01)
        return attention_rollout(encoder.vit, xn, head_fusion)[0], False, None
    if method not in LRP_RULES:
        raise ValueError(f"unknown explanation method {method!r}; use rollout, lrp or attnlrp")
    R, f, rest = lrp(encoder, x01, target, return_terms=True, rule=LRP_RULES[method])
    err = abs(float(R.sum()) + rest - f) / max(abs(f), 1e-12)
    return patch_map(R.float(), encoder.vit.cfg.patch_size)[0], True, err


def explain_inputs(encoder: Encoder, names: dict[Path, str], cfg, run, info: dict | None = None) -> dict:
    """Maps of each input (path -> output name, checked by the caller) in ``outputs/<name>/``. Each
    input is read inside its batch item, so a bad one is its line in failures.jsonl and the rest go on.
    ``info``: the encoder's settings, checked against a probe's (``--target probe``) before any input."""
    device = run.device
    if cfg.precision == "fp64":
        encoder.double()
    target, what, probe_class = None, "CLS attention flow", None
    if cfg.method in LRP_RULES:
        target, what, *named = build_target(encoder, cfg, device, info, run.log)
        probe_class = named[0] if named else None
    # the tiling of the embeddings the probe was trained on (probe.json of a newer evaluate), for whole slides
    trained = read_probe_record(Path(cfg.probe)).get("tiling") if cfg.method in LRP_RULES and \
        cfg.target == "probe" else None
    said: set = set()
    exif_said = False
    n_done, worst = 0, 0.0
    for path, out in run.batch(names, output_for=lambda p: run.outputs_dir / names[p]):
        with run.item(path):
            ts = read_input(path, slide_options={**cfg.slide_options(), "qc": False, "coords": cfg.slide_coords})
            tiler = ts.extra.get("tiler")
            differs = probe_tiling_differs(trained, tiler.target_mpp, tiler.tile_px, tiling_flags(cfg)) \
                if trained and tiler else None
            # once per run for each tiling (a cohort at one setting: one line; scanners 0.25/0.2527 µm/px: one)
            key = (f"{tiler.target_mpp:.2g}" if tiler.target_mpp else None, tiler.tile_px) if differs else None
            if differs and key not in said:
                said.add(key)
                run.log.warning("%s: %s ('tiling' in %s); explain at the probe's resolution", Path(path).name,
                                differs, Path(cfg.probe).with_suffix(".json").name)
            n = min(len(ts), cfg.max_tiles)
            if n < len(ts):
                run.log.warning("%s: explaining its first %d of %d tiles (--max-tiles)", path, n, len(ts))
            tiles = ts.read(0, n)
            exif_said = exif_said or say_exif_rotated(ts, run.log)
            maps = []
            with atomic_dir(out) as tmp:
                for i in range(n):
                    x01 = uint8_to_float(tiles[i:i + 1]).to(device)
                    heat, signed, err = patch_relevance(encoder, x01, cfg.method, target, cfg.head_fusion)
                    heat = heat.cpu().numpy()
                    if not np.isfinite(heat).all():  # an overflow: NaN maps would be written as blank overlays
                        raise TubError(f"{ts.rows[i]['origin']}: its {cfg.method} map is NaN or inf (the model's "
                                       "activations overflow on it); nothing was written for this input")
                    if err is not None:
                        worst = max(worst, err)
                    maps.append(heat)
                    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ts.rows[i]["patch_id"] or str(i))
                    png = f"{i:04d}_{slug}.png"
                    box = encoder.transform.seen_box(*tiles.shape[1:3])
                    save_png(tmp / png, overlay(tiles[i], heat, signed, cfg.alpha, box))
                    ts.rows[i]["overlay"] = png
                    ts.rows[i]["colour_min"], ts.rows[i]["colour_max"] = colour_range(heat, signed)
                np.save(tmp / "maps.npy", np.stack(maps).astype(np.float32))
                # row i of maps.npy is the tile of manifest row i (joins on tile_id / slide_id, x, y)
                write_manifest(tmp / "manifest.csv", [{**r, "row": k, "origin": absolute_origin(r["origin"])}
                                                      for k, r in enumerate(ts.rows[:n])],
                               ["row", *MANIFEST_FIELDS, "overlay", "colour_min", "colour_max"])
            n_done += n
    out = {"method": cfg.method, "explains": what, "tiles": n_done, "outputs": str(run.outputs_dir)}
    if probe_class is not None:
        out["probe_class"] = probe_class
    if cfg.method in LRP_RULES:  # AttnLRP: the balance includes the softmax rule's Taylor biases
        out["conservation_max_rel_error"] = worst
    return out
