"""data_gen.py: generate every dataset the cgmd_ref demo learns from and is judged against.

Flat, seeded and idempotent (in the manner of nanoGPT's data/*/prepare.py): each dataset is one
.npz file under --out, written atomically; a file that already exists is skipped (--force redoes
it); data/metadata.json records what each file holds, the parameters, the wall time and the
convergence figures. Everything is simulated here with cgmd_ref's MD engine: nothing is
downloaded.

    python data_gen.py            # all default datasets into data/        (~3 min on 2 cores)
    python data_gen.py --quick    # tiny versions into data/quick/          (~15 s)

Every file holds positions and velocities [n_frames, n_replicas, n_atoms, 3] (the replica axis is
there even when n_replicas = 1), unwrapped, read back with cgmd_ref.load_trajectory().

Datasets (reduced LJ units, dt = 0.005, Langevin gamma = 1, kT = 1 unless said):
  polymer_train.npz        class I polymers (training chemistry), short trajectories
  polymer_test_short.npz   class II polymers (unseen chemistry), one trajectory as short as training
  polymer_test_long.npz    the same class II polymers, long ground truth (many replicas)
  electrolyte_train_K.npz  toy electrolytes of the training compositions, short
  electrolyte_test_K_short.npz / _long.npz   unseen compositions, short and long
  stiff_low|mid|high.npz   the stiff molecule at three temperatures, every MD step saved
"""
import argparse
import os
import sys
import time

import numpy as np

import cgmd_ref as C

# Sizes. "short" is what a learned simulator may train on; "long" is the ground truth it is
# judged against ([A]: train on 50k tau chains, judge 5M tau rollouts). The R_g^2 relaxation
# time of the class I (training) polymers is 5.0-7.6 tau (quartiles; median 6.3, max 11.5), and
# their R_g^2 varies by 39% (median CV), so one trajectory of T tau estimates <R_g^2> to about
# CV sqrt(2 tau_relax / T): ~19% at T = 50 tau, 14% at 100 tau (an upper bound: one 50 tau
# run of a test polymer is a median 7-14% off its long mean). Training runs are 50 tau (8
# relaxation times): short, as [A] asks, yet long enough for the K + 1 = 4 history frames and
# the next one at a 5 tau step. The training set spends the same MD time as 48 x 2 replicas x
# 100 tau would, on twice as many chemistries. The ground truth, 24 replicas x 600 tau, has a
# standard error under 2% per polymer.
# Every polymer run starts from the generator's extended conformation and burns in for 100 tau
# (not saved) first: measured on 48 class I polymers x 2 replicas run 300 tau from that start,
# the mean R_g^2 is 2.9x its equilibrium value over the first 10 tau, still +19% at 20-30 tau
# and +14% at 40-50 tau, and within noise (-0.04 +- 0.04 in log) from 60 tau on. (With the
# 20 tau burn-in used before, every 50 tau run, training and short-MD baseline alike, was ~10%
# too large.)
SIZES = {
    "full": dict(n_train_polymers=96, train_replicas=2, short_tau=50.0, n_test_polymers=8,
                 long_replicas=24, long_tau=600.0, burn_in_tau=20.0, polymer_burn_in_tau=100.0,
                 electrolyte_short_tau=50.0, electrolyte_train_replicas=2,
                 electrolyte_long_tau=300.0, electrolyte_long_replicas=6,
                 stiff_steps=10_000, stiff_replicas=4),
    "quick": dict(n_train_polymers=4, train_replicas=1, short_tau=5.0, n_test_polymers=2,
                  long_replicas=2, long_tau=10.0, burn_in_tau=1.0, polymer_burn_in_tau=1.0,
                  electrolyte_short_tau=4.0, electrolyte_train_replicas=1,
                  electrolyte_long_tau=6.0, electrolyte_long_replicas=1,
                  stiff_steps=400, stiff_replicas=1),
}
DT = 0.005
POLYMER_SAVE_EVERY = 100          # frames every 0.5 tau
ELECTROLYTE_SAVE_EVERY = 200      # frames every 1 tau
# (n_chains, chain_length, n_salt): training compositions, and unseen test compositions
ELECTROLYTE_TRAIN = [(6, 24, 8), (6, 24, 24), (5, 30, 16)]
ELECTROLYTE_TEST = [(6, 24, 16), (7, 20, 12)]


def run(system, x, tau, replicas, seed, label, save_every, burn_in_tau, device, **kw):
    """Burn in (not saved), then a production run of `tau` with `replicas` independent copies."""
    X = np.repeat(np.asarray(x)[None], replicas, axis=0)
    n_burn = max(1, int(round(burn_in_tau / DT)))
    eq = C.simulate(system, X, n_burn, dt=DT, save_every=n_burn,   # frames: start and end
                    seed=seed + 10_000, device=device, **kw)
    n_steps = int(round(tau / DT / save_every)) * save_every
    return C.simulate(system, eq.positions[-1], n_steps, dt=DT, save_every=save_every,
                      velocities=eq.velocities[-1], seed=seed, device=device,
                      progress=label, **kw)


def polymer_sets(cfg, seed):
    """The class I training polymers and the class II test polymers, drawn from the seed (two
    streams: the test polymers do not depend on how many training polymers are drawn)."""
    train_rng, test_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    train = [C.random_polymer(1, train_rng) for _ in range(cfg["n_train_polymers"])]
    test = [C.random_polymer(2, test_rng) for _ in range(cfg["n_test_polymers"])]
    return train, test


def gen_polymers(cfg, out, seed, force, device, meta):
    train, test = polymer_sets(cfg, seed)
    jobs = [("polymer_train", train, cfg["short_tau"], cfg["train_replicas"], 1),
            ("polymer_test_short", test, cfg["short_tau"], 1, 2),
            ("polymer_test_long", test, cfg["long_tau"], cfg["long_replicas"], 3)]
    for name, polys, tau, reps, sub_seed in jobs:
        path = os.path.join(out, name + ".npz")
        if os.path.exists(path) and not force:
            print(f"{name}: exists, skipped ({path})")
            continue
        system, offsets = C.concatenate_systems([p[0] for p in polys])
        x = np.concatenate([p[1] for p in polys])
        t0 = time.perf_counter()
        traj = run(system, x, tau, reps, seed * 100 + sub_seed, name, POLYMER_SAVE_EVERY,
                   cfg["polymer_burn_in_tau"], device)
        seconds = time.perf_counter() - t0
        C.save_trajectory(path, traj, atom_offsets=offsets)
        entry = dict(file=os.path.basename(path), polymer_class=1 if name == "polymer_train" else 2,
                     n_polymers=len(polys), n_replicas=reps, tau_per_replica=tau,
                     burn_in_tau=cfg["polymer_burn_in_tau"],
                     frame_dt=DT * POLYMER_SAVE_EVERY, seconds=round(seconds, 1),
                     atom_steps_per_s=float(system.n_atoms * reps / DT / seconds
                                            * (tau + cfg["polymer_burn_in_tau"])),  # + burn-in
                     n_atoms=[int(b - a) for a, b in zip(offsets[:-1], offsets[1:])])
        if name == "polymer_test_long":
            entry["convergence"] = rg2_convergence(traj, offsets)
        meta[name] = entry
        print(f"{name}: {len(polys)} polymers x {reps} replicas x {tau:g} tau in {seconds:.1f}s")


def rg2_convergence(traj, offsets):
    """Per polymer: <R_g^2>, its standard error from independent replicas, relaxation time."""
    rows = []
    for rg2 in C.molecule_rg2(traj.positions, traj.system.masses, offsets):    # each [T, R]
        mean, se = C.replica_mean_se(rg2)
        tau = np.mean([C.relaxation_time(rg2[:, r], traj.time[1]) for r in range(rg2.shape[1])])
        rows.append(dict(rg2=mean, se=se, rel_se=se / mean, relaxation_time=float(tau)))
    worst = max(r["rel_se"] for r in rows)
    print(f"  ground-truth <R_g^2>: worst relative standard error {100 * worst:.2f}% "
          f"(target < 2%)")
    return dict(per_polymer=rows, max_rel_se=worst, target_max_rel_se=0.02,
                converged=bool(worst < 0.02))


def gen_electrolytes(cfg, out, seed, force, device, meta):
    jobs = [(f"electrolyte_train_{k}", comp, cfg["electrolyte_short_tau"],
             cfg["electrolyte_train_replicas"]) for k, comp in enumerate(ELECTROLYTE_TRAIN)]
    for k, comp in enumerate(ELECTROLYTE_TEST):
        jobs += [(f"electrolyte_test_{k}_short", comp, cfg["electrolyte_short_tau"], 1),
                 (f"electrolyte_test_{k}_long", comp, cfg["electrolyte_long_tau"],
                  cfg["electrolyte_long_replicas"])]
    for j, (name, comp, tau, reps) in enumerate(jobs):
        path = os.path.join(out, name + ".npz")
        if os.path.exists(path) and not force:
            print(f"{name}: exists, skipped ({path})")
            continue
        system, x = C.electrolyte(*comp, seed=seed)
        # The lattice start has some close anion contacts: relax them with a small step first.
        x = C.simulate(system, x, 1000, dt=0.001, save_every=1000, seed=seed).positions[-1]
        t0 = time.perf_counter()
        traj = run(system, x, tau, reps, seed * 100 + 10 + j, name, ELECTROLYTE_SAVE_EVERY,
                   cfg["burn_in_tau"], device)
        seconds = time.perf_counter() - t0
        C.save_trajectory(path, traj)
        entry = dict(file=os.path.basename(path), composition=dict(
            n_chains=comp[0], chain_length=comp[1], n_salt=comp[2]), n_replicas=reps,
            tau_per_replica=tau, frame_dt=DT * ELECTROLYTE_SAVE_EVERY, box=system.box,
            seconds=round(seconds, 1),
            atom_steps_per_s=float(system.n_atoms * reps * (tau + cfg["burn_in_tau"]) / DT
                                   / seconds))
        if name.endswith("_long"):
            entry["diffusivity"] = diffusivities(traj)
        meta[name] = entry
        print(f"{name}: {system.n_atoms} atoms x {reps} replicas x {tau:g} tau in {seconds:.1f}s")


def diffusivities(traj):
    """D of polymer beads, cations and anions: the mean over replicas and its standard error
    (each replica's MSD fitted over 20-60% of the lags)."""
    out = {}
    pos = traj.positions if traj.positions.ndim == 4 else traj.positions[:, None]
    for name, sel in (("polymer", traj.system.types <= 1), ("cation", traj.system.types == 2),
                      ("anion", traj.system.types == 3)):
        if sel.sum() == 0 or len(pos) < 11:        # too short for the 20-60% lag window
            continue
        D = [C.diffusion_coefficient(pos[:, r][:, sel], traj.time[1]) for r in range(pos.shape[1])]
        se = np.std(D, ddof=1) / np.sqrt(len(D)) if len(D) > 1 else float("nan")
        out[name] = dict(D=float(np.mean(D)), se=float(se))
        print(f"  D_{name} = {np.mean(D):.4f} +- {se:.4f}")
    return out


def gen_stiff(cfg, out, seed, force, device, meta):
    model = C.StiffMoleculeModel()
    system, x = C.stiff_molecule(model)
    for k, (label, kT) in enumerate(C.STIFF_TEMPERATURES.items()):
        name = f"stiff_{label}"
        path = os.path.join(out, name + ".npz")
        if os.path.exists(path) and not force:
            print(f"{name}: exists, skipped ({path})")
            continue
        t0 = time.perf_counter()
        # A light thermostat (gamma = 0.2): nearly Hamiltonian over a 20-step gap, yet canonical.
        traj = run(system, x, cfg["stiff_steps"] * DT, cfg["stiff_replicas"], seed * 100 + 30 + k,
                   name, 1, cfg["burn_in_tau"], device, kT=kT, gamma=0.2)
        seconds = time.perf_counter() - t0
        C.save_trajectory(path, traj)
        meta[name] = dict(file=os.path.basename(path), kT=kT, gamma=0.2, frame_dt=DT,
                          n_replicas=cfg["stiff_replicas"], n_steps=cfg["stiff_steps"],
                          ch_period_steps=model.ch_period() / DT, seconds=round(seconds, 1))
        print(f"{name}: kT={kT} {cfg['stiff_replicas']} replicas x {cfg['stiff_steps']} steps "
              f"in {seconds:.1f}s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate cgmd_ref's datasets.")
    parser.add_argument("--quick", action="store_true", help="tiny datasets, into data/quick/")
    parser.add_argument("--force", action="store_true", help="regenerate existing files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder (default data/ or data/quick/)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--only", default="polymers,electrolyte,stiff",
                        help="comma-separated subset of polymers,electrolyte,stiff")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    cfg = SIZES[size]
    out = args.out or os.path.join("data", "quick" if args.quick else "")
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "metadata.json")
    meta = C.load_json(meta_path) if os.path.exists(meta_path) else {}
    meta.update(size=size, seed=args.seed, dt=DT, config=cfg)
    t0 = time.perf_counter()
    steps = {"polymers": gen_polymers, "electrolyte": gen_electrolytes, "stiff": gen_stiff}
    for part in args.only.split(","):
        if part not in steps:
            parser.error(f"--only: unknown part {part!r}; choose from {', '.join(steps)}")
        steps[part](cfg, out, args.seed, args.force, args.device, meta)
        C.save_json(meta_path, meta)      # after each part, so an interrupted run keeps its work
    print(f"data_gen: done in {time.perf_counter() - t0:.1f}s; datasets and metadata.json in "
          f"{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
