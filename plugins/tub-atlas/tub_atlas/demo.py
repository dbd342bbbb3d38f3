"""``tub demo atlas``: the whole pipeline on synthetic tiles with a RANDOMLY INITIALISED tiny ViT.

No pretrained weights can be bundled (UNI2-h, Virchow2, RudolfV-2 are gated; Atlas 2 is not public),
so the demo's teacher is ``vit-t8-demo`` with random weights. It shows the mechanics — shape
inference round trip, embedding, kNN/linear probes, LRP and rollout maps, distillation — not the
quality of a pathology foundation model.
"""

from __future__ import annotations

import numpy as np
import torch

from tubcli.io import write_json

NOTICE = ("tub-atlas demo: the encoder is a RANDOMLY INITIALISED tiny ViT (vit-t8-demo), not a pretrained "
          "pathology model; figures show the pipeline works, not model quality.")


def run_demo(run) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread beats two (OpenMP spin-waits on a busy 2-core box)
    try:
        return _demo(run)
    finally:
        torch.set_num_threads(threads)


def _demo(run) -> dict:
    from .checkpoint import model_json, read_checkpoint, save_weights
    from .distill import train_student
    from .embedding import embed_tileset
    from .encoder import Encoder, Transform, load_encoder
    from .lrp import lrp, make_target
    from .overlay import overlay, save_png
    from .probes import classification_metrics, knn_predict, predict_linear, train_linear_probe
    from .rollout import attention_rollout
    from .synthetic import preset_config, random_vit, synthetic_tiles
    from .tiles import TileSet

    run.log.warning(NOTICE)  # stderr: `tub demo --json` stays one JSON document on stdout
    out = run.outputs_dir
    # 1. a random-weight checkpoint, saved, inspected from shapes and reloaded
    cfg = preset_config("vit-t8-demo")
    model = random_vit(cfg, seed=run.seed)
    ckpt = out / "vit-t8-demo-random.safetensors"
    save_weights(ckpt, model.state_dict(), model_json(cfg, norm="imagenet", pool="cls+mean", preset="vit-t8-demo",
                                                      source="RANDOM INIT (demo)"))
    inferred, _, _ = read_checkpoint(ckpt)
    enc, info = load_encoder("vit-t8-demo", ckpt, device=run.device)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = enc.vit.forward_features(enc.transform(x.to(run.device))).cpu()
        roundtrip = float((loaded - model.forward_features(enc.transform(x))).abs().max())
    # 2. synthetic tiles -> embeddings
    data = synthetic_tiles(n_per_class=32, n_classes=3, n_centers=2, size=64, seed=run.seed)
    rows = [{"tile_id": str(i), "origin": "synthetic", "label": lab, "slide_id": s, "patch_id": p, "x": -1, "y": -1}
            for i, (lab, s, p) in enumerate(zip(data["label"], data["slide_id"], data["patch_id"]))]
    ts = TileSet(name="synthetic", rows=rows, array_file=None)
    ts.read = lambda a, b: data["tiles"][a:b]  # in-memory tiles
    emb = embed_tileset(enc, ts, batch_size=48, device=run.device)
    np.save(out / "embeddings.npy", emb)
    # 3. probes with a slide-grouped split
    classes = sorted(set(data["label"]))
    y = np.array([classes.index(c) for c in data["label"]])
    # one slide per (class, center) cell for validation, one for test, two for training
    slide_no = np.array([s.rsplit("-s", 1)[1] for s in data["slide_id"]])
    tr, va, te = np.isin(slide_no, ["0", "1"]), slide_no == "2", slide_no == "3"
    knn = knn_predict(emb[tr], y[tr], emb[te], len(classes), k=20)
    knn_bacc = classification_metrics(y[te], knn, len(classes))["balanced_accuracy"]
    probe, _ = train_linear_probe(emb[tr], y[tr], emb[va], y[va], len(classes), seed=run.seed, max_steps=300,
                                  patience=100, eval_every=20)
    lin_bacc = classification_metrics(y[te], predict_linear(probe, emb[te]), len(classes))["balanced_accuracy"]
    # 4. explanations of the probe's class for two tiles
    x01 = torch.as_tensor(data["tiles"][:2]).permute(0, 3, 1, 2).float().div(255).to(run.device)
    target = make_target("probe", int(y[0]), probe=(probe.weight.detach(), probe.bias.detach()))
    worst = 0.0
    for i in range(2):
        R, f, bias = lrp(enc, x01[i:i + 1], target, return_terms=True)
        worst = max(worst, abs(float(R.sum()) + bias - f) / max(abs(f), 1e-12))
        heat = R[0].view(8, 8, 8, 8).sum((1, 3)).cpu().numpy()
        save_png(out / f"lrp_{i}.png", overlay(data["tiles"][i], heat, signed=True))
        roll = attention_rollout(enc.vit, enc.transform(x01[i:i + 1]))[0].cpu().numpy()
        save_png(out / f"rollout_{i}.png", overlay(data["tiles"][i], roll, signed=False))
    # 5. distil a depth-1 student from the random teacher
    student = random_vit(preset_config("vit-t8-demo", depth=1), seed=run.seed + 1)
    s_norm = Transform(img_size=64).normalise
    dist = train_student(enc, student, s_norm, data["tiles"], run, steps=40, batch_size=16, crop_size=64,
                         crop_scale_min=0.4, lr=5e-4 * 16, weight_decay=0.05, warmup=0.05, clip=3.0,
                         lambda_cls=1.0, lambda_patch=1.0, checkpoint_every=20, log_every=10)
    dist.pop("distiller")
    s_enc = Encoder(student.eval(), Transform(img_size=64), "cls+mean")
    s_emb = embed_tileset(s_enc, ts, batch_size=48, device=run.device)
    s_knn = knn_predict(s_emb[tr], y[tr], s_emb[te], len(classes), k=20)
    s_bacc = classification_metrics(y[te], s_knn, len(classes))["balanced_accuracy"]
    result = {
        "notice": "RANDOM-INIT tiny ViT (no pretrained weights bundled)",
        "inspect_depth_width_regs": f"{inferred.depth}/{inferred.embed_dim}/{inferred.reg_tokens}",
        "reload_max_abs_diff": roundtrip,
        "tiles": int(len(emb)), "embedding_dim": int(emb.shape[1]),
        "knn_balanced_accuracy": knn_bacc, "linear_balanced_accuracy": lin_bacc,
        "lrp_conservation_max_rel_error": worst,
        "distill_loss_reduction": dist["loss_reduction"],
        "student_knn_balanced_accuracy": s_bacc,
    }
    write_json(out / "demo.json", result)
    return result
