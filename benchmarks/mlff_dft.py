"""DFT cluster labels vs GFN1-xTB on the same H-capped cluster (tub mlff label --set method=dft).

Carves the cluster around the Na of a demo-size Na_1 AB gallery cell (`tub mlff build` defaults:
n=4, one aminophenyl group, gallery stacking, Na at the ring), labels it with PySCF (PBE/def2-SVP
by default; one thread) and with GFN1-xTB (tblite), and reports the cluster size, electrons, basis
functions, the DFT wall time and the MAE between the two force sets on the inner atoms (real atoms
whose bonds the cut left intact: not caps, not saturated by a cap).

    OMP_NUM_THREADS=1 python benchmarks/mlff_dft.py --radius 4 --json dft_vs_xtb.json
    # or reuse a cluster labelled by the CLI (its timing is the CLI's):
    python benchmarks/mlff_dft.py --labelled RUN/labelled.extxyz
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def demo_cell(seed: int = 0):
    from tub_mlff.structures import add_sodium, janus_graphene

    return add_sodium(janus_graphene(4, 1, "gallery", seed=seed), 1, "ring", seed=seed)


def main(argv=None) -> dict:
    from threadpoolctl import threadpool_limits

    from tub_mlff.clusters import carve_cluster
    from tub_mlff.labelling import label_pyscf, label_xtb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", help="periodic cell extxyz (first frame; default: built as in `tub mlff build`)")
    p.add_argument("--centre", type=int, help="centre atom index (default: the first Na)")
    p.add_argument("--radius", type=float, default=4.0)
    p.add_argument("--xc", default="PBE")
    p.add_argument("--basis", default="def2-SVP")
    p.add_argument("--density-fit", action="store_true")
    p.add_argument("--rattle", type=float, default=0.0, help="Gaussian displacement of the cluster atoms (A)")
    p.add_argument("--labelled", help="a DFT-labelled cluster extxyz (first frame) instead of running PySCF")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    with threadpool_limits(1):
        if args.labelled:
            from ase.io import read

            dft = read(args.labelled, 0)
            dft.info["energy"] = dft.get_potential_energy()
            dft.arrays["forces"] = dft.get_forces()
            wall = None
        else:
            from ase.io import read

            cell = read(args.cell, 0) if args.cell else demo_cell()
            centre = args.centre if args.centre is not None else cell.get_chemical_symbols().index("Na")
            cluster = carve_cluster(cell, centre, args.radius)
            if args.rattle:
                cluster.rattle(args.rattle, seed=0)
            t0 = time.perf_counter()
            dft = label_pyscf(cluster, args.xc, args.basis, density_fit=args.density_fit)
            wall = time.perf_counter() - t0
        cluster = dft.copy()
        cluster.calc = None
        for key in ("forces", "ref_charges"):
            cluster.arrays.pop(key, None)
        t0 = time.perf_counter()
        xtb = label_xtb(cluster, "GFN1-xTB")
        wall_xtb = time.perf_counter() - t0

    from pyscf import gto

    basis = dft.info["label_method"].split("/")[1]
    mol = gto.M(atom=[(s, tuple(x)) for s, x in zip(dft.get_chemical_symbols(), dft.positions)],
                basis=basis, charge=int(dft.info["charge"]), spin=int(dft.info["spin"]), verbose=0)
    pi, cap_of = dft.arrays["parent_index"], dft.arrays["cap_of"]
    inner = pi >= 0
    inner[cap_of[cap_of >= 0]] = False
    f_dft, f_xtb = dft.arrays["forces"], xtb.arrays["forces"]
    diff = np.abs(f_dft - f_xtb)
    res = {
        "machine": "2-core CPU dev box (shared), one thread", "rattle_A": args.rattle,
        "cluster": dft.get_chemical_formula(), "atoms": len(dft), "caps": int((pi < 0).sum()),
        "electrons": int(dft.numbers.sum()) - int(dft.info["charge"]), "spin": int(dft.info["spin"]),
        "basis_functions": int(mol.nao), "method": dft.info["label_method"],
        "scf_solver": dft.info.get("scf_solver"), "dft_wall_s": wall, "xtb_wall_s": wall_xtb,
        "inner_atoms": int(inner.sum()),
        "force_mae_inner_eV_A": float(diff[inner].mean()), "force_mae_all_eV_A": float(diff.mean()),
        "force_max_abs_diff_inner_eV_A": float(diff[inner].max()),
        "mean_abs_force_component_dft_inner_eV_A": float(np.abs(f_dft[inner]).mean()),
        "force_cosine_inner": float((f_dft[inner] * f_xtb[inner]).sum()
                                    / np.linalg.norm(f_dft[inner]) / np.linalg.norm(f_xtb[inner])),
        "na_mulliken_charge_dft": float(dft.arrays["ref_charges"][dft.get_chemical_symbols().index("Na")])
        if "ref_charges" in dft.arrays else None,
        "na_charge_xtb": float(xtb.arrays["ref_charges"][dft.get_chemical_symbols().index("Na")])
        if "ref_charges" in xtb.arrays else None,
    }
    print(f"{'cluster':<24}{res['cluster']} ({res['atoms']} atoms, {res['caps']} caps, "
          f"{res['electrons']} electrons, spin {res['spin']}, {res['basis_functions']} basis functions)")
    print(f"{'DFT':<24}{res['method']}  wall {wall if wall is None else round(wall, 1)} s  ({res['scf_solver']})")
    print(f"{'GFN1-xTB':<24}wall {wall_xtb:.2f} s")
    print(f"{'force MAE inner':<24}{res['force_mae_inner_eV_A']:.3f} eV/A over {res['inner_atoms']} atoms "
          f"(mean |F_dft| component {res['mean_abs_force_component_dft_inner_eV_A']:.3f}; "
          f"cosine {res['force_cosine_inner']:.3f}); all atoms {res['force_mae_all_eV_A']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
