"""Add interaction modules to a trained tub SpookyNet without changing its predictions.

The new modules are freshly initialised (seeded), except that the last layer of each new
module's output ResMLP is set to zero: a module's only contribution to the energy is its output
y = ResMLP_out(x) summed into f (Eq. 12-13), so the deepened model predicts exactly what the
original did and fine-tuning (``tub mlff train --init-from``) starts from it with more capacity.
Checks the claim on a test structure before writing.

    python deepen_model.py demo_nacnh.safetensors 3 deep3   # -> deep3.safetensors/.json
"""

import sys

import torch

from tub_mlff.checkpoints import load_model, read_model_meta, save_model
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import add_sodium, janus_graphene, spin_for


def deepen(model: SpookyNet, modules: int, seed: int = 1) -> SpookyNet:
    cfg = SpookyNetConfig.from_dict({**model.config.to_dict(), "num_modules": modules})
    deep = SpookyNet(cfg, seed=seed).to(model.dtype)
    own = model.state_dict()
    new = deep.state_dict()
    for k, v in own.items():
        new[k] = v.clone()
    for t in range(model.config.num_modules, modules):
        new[f"interactions.{t}.out.lin.weight"].zero_()
        new[f"interactions.{t}.out.lin.bias"].zero_()
    deep.load_state_dict(new)
    if model.d4 is not None and model.d4.has_tables:
        deep.d4.load_tables(model.d4.tables())
    return deep.eval()


if __name__ == "__main__":
    from tub_mlff.calculator import SpookyNetCalculator

    src, modules, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, _ = load_model(src, torch.float64)
    deep = deepen(model, modules)
    a = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 2, "random", seed=1)
    a.rattle(0.05, seed=0)
    e = []
    for m in (model, deep):
        b = a.copy()
        b.calc = SpookyNetCalculator(m, spin=spin_for(a), dtype=torch.float64)
        e.append((b.get_potential_energy(), b.get_forces()))
    assert abs(e[0][0] - e[1][0]) < 1e-8 and abs(e[0][1] - e[1][1]).max() < 1e-8, "deepened model differs"
    meta = read_model_meta(src)
    extra = {k: v for k, v in meta.items() if k not in ("architecture", "spookynet")}
    extra["deepened_from"] = str(src)
    save_model(deep.float(), out, extra=extra)
    print(f"{src}: {model.config.num_modules} -> {modules} modules, {deep.num_parameters()} parameters;"
          f" energy difference {abs(e[0][0] - e[1][0]):.1e} eV -> {out}.safetensors")
