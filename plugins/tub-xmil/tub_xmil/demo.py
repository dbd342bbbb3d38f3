"""Quick start: synthetic slides -> tiles -> features -> AttnMIL -> LRP heatmaps (PNG + GeoJSON)."""

from __future__ import annotations

import time
import numpy as np
import torch

from tubcli.errors import TubError

DEMO_ENCODER = "vit-t8-demo"


def run_demo(run) -> dict:
    from tubcli.plugins import patch_encoders

    from tub_xmil.bags import write_features_h5
    from tub_xmil.cli import HEAT_DOWNSAMPLE
    from tub_xmil.config import TilingSection, TrainConfig
    from tub_xmil.dataset import Slide
    from tub_xmil.explain import explain
    from tub_xmil.features import embed_tiles, get_encoder
    from tub_xmil.heatmap import write_heatmap
    from tub_xmil.pipeline import thumbnail_for
    from tub_xmil.slides import open_slide, slide_mpp
    from tub_xmil.synthetic import make_dataset
    from tub_xmil.tiling import tile_slide
    from tub_xmil.training import predict, task_metrics, train_model

    t0 = time.perf_counter()
    if DEMO_ENCODER not in patch_encoders():
        raise TubError(f"the xmil demo embeds tiles with the {DEMO_ENCODER!r} encoder offered by tub-atlas, "
                       "which is not installed; pip install 'tub-xmil[encoders]' (in a clone: pip install -e plugins/tub-atlas)")
    spec, module = get_encoder(DEMO_ENCODER, None, "cpu")
    run.log.info("encoder %s: RANDOM-INIT demo weights (%s); features carry colour/texture only",
                 spec.name, spec.description)
    data = run.dir / "data"
    rows = make_dataset(data, n_slides=8, width=1536, height=1152, seed=run.seed)
    tiling = TilingSection(patch_size=128)  # 64 um tiles: more instances per small slide
    (run.outputs_dir / "features").mkdir(parents=True, exist_ok=True)
    slides = []
    for r in rows:
        path = data / "slides" / f"{r['slide_id']}.tiff"
        s = open_slide(path)
        t = tile_slide(s, slide_mpp(s, path), tiling.target_mpp, tiling.patch_size, name=path.name)
        feats = embed_tiles(s, t.coords, t.patch_size_level0, spec, module)
        thumb, _ = thumbnail_for(s)
        W, H = s.dimensions
        s.close()
        write_features_h5(run.outputs_dir / "features" / f"{r['slide_id']}.h5", feats, t.coords,
                          {"encoder": spec.name, "patch_size_level0": t.patch_size_level0})
        slides.append((Slide(r["slide_id"], torch.from_numpy(feats), t.coords, float(r["label"]), split=r["split"]),
                       thumb, (W, H), t.patch_size_level0))
    t_feat = time.perf_counter() - t0
    cfg = TrainConfig(task="classification", epochs=20, lr=1e-3)
    cfg.model.features_dim = 32
    train = [s for s, *_ in slides if s.split == "train"]
    test = [s for s, *_ in slides if s.split == "test"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-d AttnMIL trains faster on one thread than on two
    try:
        model, meta = train_model(cfg, run, train, [], [0, 1])
    finally:
        torch.set_num_threads(threads)
    run.save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    test_metrics = task_metrics(test, predict(model, test, "classification"), "classification")
    model = model.cpu()  # explanations run on the CPU, as `tub xmil explain` does (training may use a GPU)
    from PIL import Image
    for s, thumb, (W, H), size0 in slides:
        if s.split != "test":
            continue
        scores = explain(model, s.features, "lrp", "classification", target=1)
        thumb = np.asarray(Image.fromarray(thumb).resize((W // HEAT_DOWNSAMPLE, H // HEAT_DOWNSAMPLE)))
        write_heatmap(run.outputs_dir / "heatmaps", s.slide_id, thumb, s.coords, scores, size0,
                      HEAT_DOWNSAMPLE, True, "lrp")
    return {"slides": len(rows), "tiles": int(sum(len(s.coords) for s, *_ in slides)),
            "encoder": f"{spec.name} (random init)", "features_s": round(t_feat, 1),
            "test_balanced_accuracy": test_metrics["balanced_accuracy"],
            "heatmaps": sum(s.split == "test" for s, *_ in slides)}  # in outputs/heatmaps/
