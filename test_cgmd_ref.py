"""Tests for cgmd_ref in the order of its sections (§0 helpers ... §11 bench and command line):
physics invariants and exact results, two-path cross-checks, estimators with known answers, smoke
runs of the experiments and scripts, and per section one table of bad input (one case per check).
Only the public API is called.

Statistical tests use fixed seeds and tolerances derived from the expected error of the
quantity tested (the derivation sits beside each assert). Physics runs in float64.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import scipy.stats
import pytest
import torch
from scipy.signal import lfilter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

import cgmd_ref as C
from cgmd_ref import (autocorrelation, block_standard_error, collision_rate,
                      diffusion_coefficient, free_energy_surface, mean_squared_displacement,
                      pairwise_distance_features, radial_distribution, radius_of_gyration_sq,
                      relaxation_time)

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


# ---- shared helpers and fixtures ----------------------------------------------------------------

POLYMER, POLYMER_X = C.random_polymer(1, np.random.default_rng(0))   # read-only in the tests


def small_electrolyte(seed=0):
    """A 96-atom electrolyte, relaxed a little so no pair is very close (box just > 2 r_cut)."""
    system, x = C.electrolyte(4, 12, 24, seed=seed)
    tr = C.simulate(system, x, 200, dt=0.002, save_every=200, dtype="float64", seed=seed)
    return system, tr.positions[-1]


def _two_polymers(seed=0):
    """A CG system of two small class I polymers (isolated molecules) and a CG frame of it."""
    rng = np.random.default_rng(seed)
    polymers = [C.random_polymer(1, rng) for _ in range(2)]
    system, _ = C.concatenate_systems([p[0] for p in polymers])
    x = np.concatenate([p[1] for p in polymers])
    cg = C.cg_system(system, 4.0)
    return system, cg, x


def _dynamics_model(correlated=True, seed=0):
    torch.manual_seed(seed)
    cfg = C.DynamicsConfig(latent=16, n_steps=2, correlated=correlated,
                           embedding=C.EmbeddingConfig(latent=16, n_steps=2))
    return C.DynamicsGNN(cfg).double().eval()


def _history(cg, B=2, K=3, seed=0):
    """[B, K + 1, n, 3] float64 histories: beads on a random walk around a random shape."""
    g = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(1, 1, cg.n_beads, 3, generator=g, dtype=torch.float64)
    return base + 0.3 * torch.randn(B, K + 1, cg.n_beads, 3, generator=g,
                                    dtype=torch.float64).cumsum(1)


def _free_beads(n):
    """A CG system of n unbonded one-atom beads in open space: no edges, every bead alone."""
    z = np.zeros(0, dtype=np.int64)
    return C.CGSystem(atom_types=np.zeros(n, dtype=np.int64), bonds=z.reshape(0, 2),
                      bond_type=z, labels=np.arange(n), bead_mass=np.ones(n),
                      cg_bonds=z.reshape(0, 2), molecule=np.arange(n), box=None)


def _quick_data(folder, part):
    """Tiny datasets of one part, written by data_gen (the experiments never generate data)."""
    sys.path.insert(0, HERE)
    import data_gen
    data_gen.main(["--quick", "--out", str(folder), "--only", part])
    return str(folder)


def _run(*args, cwd):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def protein_like_graph(n_residues: int, rng):
    """A protein-like bond graph: backbone N-CA-C(=O) per residue, side chains of 0-6 atoms on CA
    (a fifth of those of length >= 2 end in a six-membered ring), one disulfide-like crosslink
    per 50 residues between side-chain tips. Returns (n_atoms, bonds [m, 2])."""
    bonds, tips, n, prev_c = [], [], 0, None
    for _ in range(n_residues):
        N, CA, C, n = n, n + 1, n + 2, n + 4                  # O is C + 1
        bonds += [(N, CA), (CA, C), (C, C + 1)] + ([] if prev_c is None else [(prev_c, N)])
        prev_c, last = C, CA
        length = int(rng.integers(0, 7))
        for _ in range(length):
            bonds.append((last, n))
            last, n = n, n + 1
        if length >= 2 and rng.random() < 0.2:      # an aromatic ring on the tip
            ring = [last] + list(range(n, n + 5))
            n += 5
            bonds += [(ring[i], ring[(i + 1) % 6]) for i in range(6)]
        if length:
            tips.append(last)
    bonds += [tuple(rng.choice(tips, 2, replace=False).tolist())       # crosslinks
              for _ in range(max(1, n_residues // 50))]
    return n, np.array(bonds, dtype=np.int64)


# ---- §0 helpers: device and dtype ---------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: C.resolve_device("tpu"), "device"),
    (lambda: C.simulate(POLYMER, POLYMER_X, 10, dtype="float16"), "dtype"),
])
def test_helpers_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §1 MD engine: forces and energies, exact and cross-checked; dynamics -----------------------

def lj_pair_energy(r, eps, sig, rc):
    """Truncated and shifted LJ, written out independently of the module."""
    def u(x):
        s6 = (sig / x) ** 6
        return 4 * eps * (s6 * s6 - s6)
    return np.where(r < rc, u(r) - u(rc), 0.0)


def brute_force_energy(system, x):
    """Sum over all pairs and, in a box, over all 27 neighbouring images (no minimum image)."""
    n = system.n_atoms
    bonded = {tuple(sorted(b)) for b in system.bonds.tolist()}
    images = [np.zeros(3)] if system.box is None else [
        system.box * np.array([a, b, c]) for a in (-1, 0, 1) for b in (-1, 0, 1)
        for c in (-1, 0, 1)]
    e = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            if (i, j) in bonded:
                continue
            ti, tj = system.types[i], system.types[j]
            for img in images:
                r = np.linalg.norm(x[i] - x[j] + img)
                e += float(lj_pair_energy(r, system.epsilon[ti, tj], system.sigma[ti, tj],
                                          system.r_cut))
    for (i, j), k, r0 in zip(system.bonds, system.bond_k, system.bond_r0):
        d = x[i] - x[j]
        if system.box is not None:
            d -= system.box * np.round(d / system.box)
        e += 0.5 * k * (np.linalg.norm(d) - r0) ** 2
    return e


def ideal_chain(n_beads, k):
    """Beads joined by zero-rest-length springs, no LJ (epsilon = 0)."""
    bonds = np.stack([np.arange(n_beads - 1), np.arange(1, n_beads)], 1)
    system = C.System(types=np.zeros(n_beads, int), masses=np.ones(n_beads), bonds=bonds,
                      bond_k=k, bond_r0=0.0, epsilon=[[0.0]], sigma=[[1.0]], r_cut=2.5)
    x = np.zeros((n_beads, 3))
    x[:, 0] = 0.5 * np.arange(n_beads)
    return system, x


def engine(x, dtype=torch.float64):
    """[n, 3] numpy -> [3, n] torch: the engine layout that ForceField and PairList take."""
    return torch.as_tensor(np.ascontiguousarray(x.T), dtype=dtype)


def test_forces_are_minus_gradient_autograd():
    # Two code paths: the hand-written force kernel against autograd of the energy kernel.
    system, x = small_electrolyte()
    ff = C.ForceField(system, 1, "cpu", torch.float64)
    xe = engine(x).requires_grad_(True)
    ff.pairs.build(xe)
    (grad,) = torch.autograd.grad(ff.energy(xe).sum(), xe)
    F = ff.forces(xe.detach())
    assert torch.allclose(F, -grad, rtol=1e-10, atol=1e-10)


def test_forces_match_finite_differences():
    system, x = C.random_polymer(2, np.random.default_rng(3))
    F = C.forces(system, x)
    h = 1e-6
    for atom, axis in [(0, 0), (5, 1), (system.n_atoms - 1, 2)]:
        xp, xm = x.copy(), x.copy()
        xp[atom, axis] += h
        xm[atom, axis] -= h
        fd = -(C.potential_energy(system, xp) - C.potential_energy(system, xm)) / (2 * h)
        # central differences: error ~ h^2 U''' ~ 1e-10; round-off ~ 1e-16 |U| / h ~ 1e-9
        assert fd == pytest.approx(F[atom, axis], abs=1e-6)


def test_minimum_image_matches_sum_over_images():
    system, x = small_electrolyte(seed=1)
    assert system.box < 2 * system.r_cut + 1.0   # small box: images matter
    # Unwrapped coordinates: shifting atoms by whole boxes must change nothing.
    shifted = x + system.box * np.random.default_rng(0).integers(-3, 4, x.shape)
    e = C.potential_energy(system, shifted)
    assert e == pytest.approx(brute_force_energy(system, x), rel=1e-10, abs=1e-10)
    assert np.allclose(C.forces(system, shifted), C.forces(system, x), atol=1e-9)


def test_open_boundary_energy_matches_brute_force():
    system, x = C.random_polymer(1, np.random.default_rng(0))
    x = x + np.random.default_rng(1).normal(0, 0.05, x.shape)
    assert C.potential_energy(system, x) == pytest.approx(brute_force_energy(system, x),
                                                          rel=1e-10)


def test_verlet_list_matches_all_pairs_and_stays_valid_within_skin():
    # A 600-atom open system uses the k-d tree path; compare with all pairs (brute force).
    fluid, xf = C.lj_fluid(600, 0.5, seed=2)
    system = C.System(types=fluid.types, masses=fluid.masses, bonds=fluid.bonds, bond_k=0.0,
                      bond_r0=0.0, epsilon=fluid.epsilon, sigma=fluid.sigma, r_cut=2.5)
    ff = C.ForceField(system, 1, "cpu", torch.float64)
    assert not ff.pairs.static
    x0 = engine(xf)
    ff.pairs.build(x0)
    # all pairs closer than r_cut + skin, by brute force
    d = np.linalg.norm(xf[:, None] - xf[None], axis=-1)
    iu = np.triu_indices(len(xf), 1)
    expected = {p for p, r in zip(zip(*iu), d[iu]) if r < system.r_cut + ff.pairs.skin}
    got = set(zip(ff.pairs.i.tolist(), ff.pairs.j.tolist()))
    assert got == expected
    # Move every atom by just under skin/2: the old list must give the same forces as a new one.
    rng = np.random.default_rng(3)
    step = rng.normal(size=x0.shape)
    step *= 0.499 * ff.pairs.skin / np.linalg.norm(step, axis=0)
    x1 = x0 + torch.as_tensor(step)
    moved, top2 = ff.pairs.displacement_since_build(x1)
    assert not ff.pairs.needs_rebuild(top2)
    F_old = ff.forces(x1)
    ff.pairs.build(x1)
    assert torch.allclose(F_old, ff.forces(x1), atol=1e-12)


def test_periodic_pair_search_in_parallel_slabs_matches_all_pairs():
    # A box of >= 4 (r_cut + skin) is searched as two slabs in two threads (each slab's tree
    # holds the atoms just above it): the same pairs as brute force, once each, in 2 replicas.
    system, x = C.lj_fluid(1500, 0.8, seed=4)
    X = np.stack([x, x + np.random.default_rng(0).normal(0, 0.3, x.shape)])
    threads, n = torch.get_num_threads(), system.n_atoms
    torch.set_num_threads(2)
    try:
        ff = C.ForceField(system, 2, "cpu", torch.float64)
        ff.pairs.build(torch.as_tensor(X.reshape(-1, 3).T.copy()))
    finally:
        torch.set_num_threads(threads)
    r = system.r_cut + ff.pairs.skin
    assert system.box >= 4 * r
    expected = set()
    for rep, xr in enumerate(X):
        d = xr[:, None] - xr[None]
        d -= system.box * np.round(d / system.box)
        i, j = np.nonzero(np.triu(np.linalg.norm(d, axis=-1) < r, 1))
        expected |= set(zip((i + rep * n).tolist(), (j + rep * n).tolist()))
    got = list(zip(ff.pairs.i.tolist(), ff.pairs.j.tolist()))
    assert len(got) == len(set(got)) and set(got) == expected
    # an atom one float below a slab face whose slab index rounds up, 1 sigma from a neighbour
    box = 12.985
    two = C.System(types=[0, 0], masses=[1.0, 1.0], bonds=np.zeros((0, 2)), bond_k=1.0,
                   bond_r0=1.0, epsilon=[[1.0]], sigma=[[1.0]], box=box)
    x2 = np.array([[np.nextafter(box / 2, 0), 1.0, 1.0], [box / 2 - 1, 1.0, 1.0]])
    torch.set_num_threads(2)
    try:
        ff = C.ForceField(two, 1, "cpu", torch.float64)
        ff.pairs.build(torch.as_tensor(x2.T.copy()))
    finally:
        torch.set_num_threads(threads)
    assert (ff.pairs.i.tolist(), ff.pairs.j.tolist()) == ([0], [1])


def test_replicas_equal_one_by_one_and_isolated_molecules_do_not_interact():
    sys_a, xa = C.random_polymer(1, np.random.default_rng(5))
    sys_b, xb = C.random_polymer(2, np.random.default_rng(6))
    joined, offsets = C.concatenate_systems([sys_a, sys_b])
    xj = np.concatenate([xa, xb + 0.3])        # overlapping in space, yet isolated
    F = C.forces(joined, xj)
    assert np.allclose(F[:offsets[1]], C.forces(sys_a, xa), atol=1e-12)
    assert np.allclose(F[offsets[1]:], C.forces(sys_b, xb + 0.3), atol=1e-12)
    # Replicas: a batch [R, n, 3] gives each replica's own forces and energy.
    rng = np.random.default_rng(7)
    X = xa[None] + rng.normal(0, 0.05, (3,) + xa.shape)
    FB, EB = C.forces(sys_a, X), C.potential_energy(sys_a, X)
    for r in range(3):
        assert np.allclose(FB[r], C.forces(sys_a, X[r]), atol=1e-12)
        assert EB[r] == pytest.approx(C.potential_energy(sys_a, X[r]), rel=1e-12)


def test_batched_simulation_equals_one_by_one_without_noise():
    system, x = small_electrolyte()
    X = np.stack([x, x + 0.01])
    V = np.random.default_rng(0).normal(0, 1, X.shape)
    kw = dict(dt=0.002, gamma=0.0, save_every=50, dtype="float64")
    batch = C.simulate(system, X, 200, velocities=V, **kw)
    for r in range(2):
        one = C.simulate(system, X[r], 200, velocities=V[r], **kw)
        assert np.allclose(batch.positions[:, r], one.positions, atol=1e-9)


def test_float32_forces_agree_with_float64():
    system, x = small_electrolyte()
    ff32 = C.ForceField(system, 1, "cpu", torch.float32)
    x32 = engine(x, torch.float32)
    ff32.pairs.build(x32)
    F32 = ff32.forces(x32).T.numpy()
    F64 = C.forces(system, x)
    scale = np.abs(F64).max()
    assert np.abs(F32 - F64).max() < 1e-4 * scale   # float32 round-off ~1e-7 per term


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu():
    system, x = small_electrolyte()
    kw = dict(dt=0.002, gamma=0.0, save_every=50, dtype="float64",
              velocities=np.zeros_like(x))
    cpu = C.simulate(system, x, 100, **kw)
    gpu = C.simulate(system, x, 100, device="cuda", **kw)
    assert np.allclose(cpu.positions, gpu.positions, atol=1e-8)


def test_nve_energy_drift_float64():
    # Issue target: velocity Verlet (gamma = 0), float64, dt = 0.002, 1e4 steps: the total energy
    # drifts by less than 5e-3 kT per particle. The LJ fluid exercises pair-list rebuilds and the
    # minimum image; energy is shifted-potential energy, continuous at r_cut.
    system, x = C.lj_fluid(256, 0.8, seed=0)
    eq = C.simulate(system, x, 500, dt=0.002, save_every=500, dtype="float64")
    tr = C.simulate(system, eq.positions[-1], 10_000, dt=0.002, gamma=0.0, save_every=100,
                    velocities=eq.velocities[-1], dtype="float64")
    e = tr.potential_energy + tr.kinetic_energy
    drift = np.abs(e - e[0]).max() / system.n_atoms
    print(f"NVE max |E(t) - E(0)| per particle: {drift:.2e} kT")
    assert drift < 5e-3
    # momentum is conserved exactly (pairwise forces) up to round-off
    p = tr.velocities.sum(1)
    assert np.abs(p - p[0]).max() < 1e-9


def test_langevin_kinetic_energy_equipartition():
    # <KE> = (3/2) N kT, issue target within 1%. 64 replicas of a 21-bead polymer, kT = 1.5.
    # Equipartition holds for any friction; gamma = 4 makes KE decorrelate fast (1/(2 gamma)).
    system, x = C.random_polymer(1, np.random.default_rng(1))
    kT = 1.5
    X = np.repeat(x[None], 64, axis=0)
    tr = C.simulate(system, X, 9000, kT=kT, gamma=4.0, save_every=10, dtype="float64", seed=3)
    ke = tr.kinetic_energy[100:] / system.n_atoms          # [frames, replicas], 5 tau burn-in
    expected = 1.5 * kT
    # Replicas are independent, so the spread of their time averages gives an honest SE.
    # One atom's KE has relative std sqrt(2/3) and decorrelates in 1/(2 gamma) = 2.5 frames;
    # 21 atoms x 64 replicas x (~800 frames / 5) ~ 2e5 independent samples: SE ~ 0.2%.
    per_replica = ke.mean(0)
    se = per_replica.std(ddof=1) / math.sqrt(len(per_replica))
    print(f"<KE>/(3/2 N kT) = {per_replica.mean() / expected:.4f} +- {se / expected:.4f}")
    assert se / expected < 0.003                          # the 1% test is sensitive (> 3 SE)
    assert abs(per_replica.mean() / expected - 1) < 0.01
    assert abs(per_replica.mean() - expected) < 5 * se    # and consistent with noise


def test_ideal_chain_bond_length_and_radius_of_gyration():
    # Exact for zero-rest-length harmonic bonds: <b^2> = 3 kT / k and
    # <R_g^2> = <b^2> (N^2 - 1) / (6 N). N = 8, k = 12: <b^2> = 1/4, <R_g^2> = 21/64.
    # Stiff springs keep the slowest mode fast: stiffness 4 k sin^2(pi / 2N) = 1.83 > gamma^2 / 4,
    # so at gamma = 1 it is underdamped and relaxes as exp(-gamma t / 2), in 2 tau.
    n, k = 8, 12.0
    system, x = ideal_chain(n, k)
    X = np.repeat(x[None], 128, axis=0)
    tr = C.simulate(system, X, 12_000, save_every=10, dtype="float64", seed=4)
    pos = tr.positions[100:]                              # drop 5 tau of burn-in
    rg2 = radius_of_gyration_sq(pos, system.masses).mean(0)   # time average per replica [R]
    b2 = (np.diff(pos, axis=2) ** 2).sum(-1).mean((0, 2))     # [R]
    for per_replica, exact in ((rg2, 0.25 * 63 / 48), (b2, 3.0 / k)):
        # independent replicas: SE of the grand mean from the spread of replica averages
        se = per_replica.std(ddof=1) / math.sqrt(len(per_replica))
        print(f"ideal chain: measured {per_replica.mean():.4f} +- {se:.4f}, exact {exact:.4f}")
        assert se / exact < 0.01                          # sensitive enough
        # BAOAB samples harmonic configurations exactly (Leimkuhler-Matthews), so no bias term.
        assert abs(per_replica.mean() - exact) < 4 * se, (per_replica.mean(), exact, se)


def test_centre_of_mass_diffuses_with_kT_over_M_gamma():
    # Internal forces cancel in the centre of mass, so with equal gamma for every atom it is an
    # exact free Langevin particle of mass M: <|dX(t)|^2> = 6 D [t - (1 - exp(-gamma t))/gamma]
    # with D = kT / (M gamma), for Maxwell-Boltzmann initial velocities.
    system, x = C.random_polymer(2, np.random.default_rng(2))
    M, gamma, kT, R = system.masses.sum(), 2.0, 1.0, 1024   # 4 SE = 10%
    X = np.repeat(x[None], R, axis=0)
    # t = 2 tau (gamma t = 4): both the ballistic correction and the diffusive term count
    tr = C.simulate(system, X, 400, gamma=gamma, kT=kT, save_every=400, dtype="float64")
    com = (tr.positions * system.masses[:, None]).sum(2) / M        # [2, R, 3]
    dx2 = ((com[1] - com[0]) ** 2).sum(-1)                          # [R]
    t = tr.time[1]
    D = kT / (M * gamma)
    exact = 6 * D * (t - (1 - math.exp(-gamma * t)) / gamma)
    # |dX|^2 / (exact / 3) is chi-squared with 3 dof: relative SE of the mean sqrt(2 / (3 R)).
    se = exact * math.sqrt(2 / (3 * R))
    print(f"COM <dX^2>: measured {dx2.mean():.4f}, exact {exact:.4f} (SE {se:.4f})")
    assert abs(dx2.mean() - exact) < 4 * se, (dx2.mean(), exact, se)


def test_same_seed_same_trajectory_and_seeds_differ():
    system, x = C.random_polymer(1, np.random.default_rng(0))
    a = C.simulate(system, x, 300, save_every=100, seed=11)
    b = C.simulate(system, x, 300, save_every=100, seed=11)
    c = C.simulate(system, x, 300, save_every=100, seed=12)
    assert np.array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions, c.positions)


def test_trajectory_layout_and_unwrapped_positions():
    system, x = C.lj_fluid(200, 0.6, seed=1)
    tr = C.simulate(system, x, 1000, save_every=100, seed=2)
    assert tr.positions.shape == (11, 200, 3) and tr.velocities.shape == (11, 200, 3)
    assert tr.time.shape == (11,) and tr.potential_energy.shape == (11,)
    assert tr.time[-1] == pytest.approx(1000 * 0.005)
    # unwrapped: no frame-to-frame jump near a box length
    assert np.abs(np.diff(tr.positions, axis=0)).max() < 0.5 * system.box
    R = np.stack([x, x])
    trb = C.simulate(system, R, 100, save_every=50)
    assert trb.positions.shape == (3, 2, 200, 3) and trb.kinetic_energy.shape == (3, 2)


def test_lj_fluid_rdf_has_liquid_structure():
    system, x = C.lj_fluid(500, 0.8, seed=0)
    tr = C.simulate(system, x, 1500, save_every=50, seed=1)
    r, g = radial_distribution(tr.positions[10:], system.box, system.box / 2, 40)
    assert g[r < 0.8].max() < 0.05              # excluded core
    assert 2.0 < g.max() < 4.0 and 0.95 < r[np.argmax(g)] < 1.25   # first shell near 2^(1/6)
    assert abs(g[-5:].mean() - 1) < 0.1        # no long-range order


def test_blow_up_stops_with_an_error_naming_the_step():
    system, x = C.lj_fluid(64, 0.5, r_cut=2.5)
    x = x.copy()
    x[1] = x[0] + [0.3, 0, 0]                   # a near overlap: force ~ 3e8
    with pytest.raises(C.SimulationBlowUp, match="step"):
        C.simulate(system, x, 100, dt=0.05, save_every=100)


def _system(**over):
    kw = dict(types=[0, 0, 0], masses=[1.0, 1.0, 1.0], bonds=[[0, 1]], bond_k=1.0, bond_r0=1.0,
              epsilon=[[1.0]], sigma=[[1.0]], r_cut=2.5, box=None)
    kw.update(over)
    return C.System(**kw)


def _simulate(n_steps=10, x=POLYMER_X, **kw):
    return C.simulate(POLYMER, x, n_steps, **kw)


@pytest.mark.parametrize("call, match", [
    (lambda: _system(masses=[1.0, -1.0, 1.0]), "masses"),
    (lambda: _system(masses=[1.0, np.nan, 1.0]), "masses"),
    (lambda: _system(bonds=[[0, 3]]), "bonds"),
    (lambda: _system(bond_k=[1.0, 2.0]), "bond_k"),
    (lambda: _system(box=4.0), "box"),
    (lambda: _system(box=-1.0), "box"),
    (lambda: _system(epsilon=[[1.0, 0.5], [0.2, 1.0]], sigma=[[1, 1], [1, 1]]), "epsilon"),
    (lambda: _system(types=[0, 1, 2]), "epsilon"),
    (lambda: _system(sigma=[[0.0]]), "sigma"),
    (lambda: _system(epsilon=np.ones((2, 2))), "epsilon has shape .2, 2. and sigma .1, 1."),
    (lambda: _system(epsilon=[[-1.0]]), "epsilon must be finite and non-negative"),
    (lambda: _system(r_cut=0.0), "r_cut"),
    (lambda: C.forces(POLYMER, POLYMER_X[:, :2]), "positions"),
    (lambda: _simulate(x=np.where(np.arange(3) == 0, np.inf, POLYMER_X)), "positions"),
    (lambda: _simulate(dt=0.0), "dt"),
    (lambda: _simulate(kT=0.0), "kT"),
    (lambda: _simulate(gamma=-1.0), "gamma"),
    (lambda: _simulate(save_every=0), "save_every"),
    (lambda: _simulate(n_steps=-5), "n_steps"),
    (lambda: _simulate(velocities=np.zeros((3, 3))), "velocities"),
])
def test_md_engine_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §2 toy worlds ------------------------------------------------------------------------------

def test_polymer_classes_differ_and_stay_in_size_range():
    rng = np.random.default_rng(0)
    stats = {}
    for cls in (1, 2):
        systems = [C.random_polymer(cls, rng)[0] for _ in range(60)]
        sizes = [s.n_atoms for s in systems]
        assert 16 <= min(sizes) and max(sizes) <= 40
        stats[cls] = np.mean([np.mean(s.types == 3) for s in systems])   # S2 fraction
        for s in systems:   # one connected molecule
            adjacency = coo_matrix((np.ones(len(s.bonds)), (s.bonds[:, 0], s.bonds[:, 1])),
                                   shape=(s.n_atoms, s.n_atoms))
            assert connected_components(adjacency, directed=False)[0] == 1
    assert stats[2] > 2 * stats[1]             # class II is S2-rich: different chemistry


def test_electrolyte_composition_and_stiff_molecule_periods():
    system, x = C.electrolyte(5, 20, 15, seed=0)
    assert system.n_atoms == 5 * 20 + 30
    assert np.bincount(system.types).tolist() == [5 * 20 - 5 * 6, 5 * 6, 15, 15]
    assert len(np.unique(system.molecule)) == 5 + 30
    d = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.eye(len(x)) * 9
    assert d.min() > 0.9                        # one atom per lattice site (0.95 apart)
    model = C.StiffMoleculeModel()
    mol, y = C.stiff_molecule(model)
    assert mol.n_atoms == 12
    assert 5 <= model.ch_period() / 0.005 <= 20   # fast vibration: a few to ~20 MD steps
    bonded = np.linalg.norm(y[mol.bonds[:, 0]] - y[mol.bonds[:, 1]], axis=1)
    assert np.allclose(bonded, mol.bond_r0)       # built at rest


@pytest.mark.parametrize("call, match", [
    (lambda: C.lj_fluid(100, 0.0), "density"),
    (lambda: C.random_polymer(3, np.random.default_rng(0)), "polymer_class"),
])
def test_toy_worlds_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §3 files -----------------------------------------------------------------------------------

def test_trajectory_round_trip_without_pickle(tmp_path):
    system, x = C.electrolyte(4, 12, 24)
    tr = C.simulate(system, x, 20, dt=0.002, save_every=10)
    path = tmp_path / "t.npz"
    C.save_trajectory(path, tr, labels=np.arange(3))
    back, extra = C.load_trajectory(path)
    assert np.allclose(back.positions, tr.positions, atol=1e-5)
    assert back.system.box == system.box and np.array_equal(back.system.bonds, system.bonds)
    assert back.info["n_steps"] == 20 and extra["labels"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["t.npz"]                        # no temporary left behind
    assert os.stat(tmp_path / "t.npz").st_mode & 0o777 == 0o644     # readable, as any file
    # an object array (unpickled on load, so it could run code) is refused
    arrays = dict(np.load(tmp_path / "t.npz", allow_pickle=False))
    np.savez(tmp_path / "obj.npz", **{**arrays, "positions": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        C.load_trajectory(tmp_path / "obj.npz")


def test_trajectory_from_arrays_feeds_the_pipeline():
    """The README's own-trajectory recipe, on arrays from our own MD: the wrapped trajectory
    coarse-grains exactly like the original, trains and rolls out, and gives velocities by
    central differences when none are passed."""
    rng = np.random.default_rng(3)
    system, x = C.random_polymer(1, rng)
    tr = C.simulate(system, np.stack([x, x]), 400, save_every=20, seed=1)   # [21, 2, n, 3]
    own = C.trajectory_from_arrays(tr.positions, system.masses, system.bonds, types=system.types,
                                   frame_dt=0.1)
    assert own.positions.shape == tr.positions.shape and own.time[-1] == pytest.approx(2.0)
    inner = (tr.positions[2:] - tr.positions[:-2]) / 0.2
    assert np.allclose(own.velocities[1:-1], inner)                   # central differences
    cg_a, cg_b = C.cg_system(system, 4), C.cg_system(own.system, 4)
    assert np.array_equal(cg_a.labels, cg_b.labels) and np.array_equal(cg_a.cg_bonds,
                                                                        cg_b.cg_bonds)
    xc = C.coarse_grain(own.positions, cg_b.labels, own.system.masses)    # [F, R, n_beads, 3]
    cfg = C.DynamicsConfig(n_history=1, latent=8, n_steps=1,
                           embedding=C.EmbeddingConfig(latent=8, n_steps=1))
    model = C.train_dynamics(xc, cg_b, cfg, C.TrainConfig(stride=2, n_iterations=3), label=None)
    frames = C.rollout(model, cg_b, xc[0:4:2, 0][None], 3)
    assert frames.shape[1:] == (1, cg_b.n_beads, 3) and np.isfinite(frames).all()
    one = C.trajectory_from_arrays(tr.positions[:, 0], system.masses, system.bonds)
    (p, v), (q, w) = C.split_segments(one, gap=2)            # no replica axis: one replica
    assert p.shape[1:] == (3, system.n_atoms, 3) and np.array_equal(q[0], one.positions[18:21])


@pytest.mark.parametrize("call, match", [
    (lambda: C.trajectory_from_arrays(np.zeros((3, 4, 3)), np.ones(3)), "masses"),
    (lambda: C.trajectory_from_arrays(np.zeros((1, 4, 3)), np.ones(4)), "positions"),
])
def test_files_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §4 coarse-graining: partitioning, CG mapping, CG graphs, Embedding GNN ---------------------

def _adjacency(n_atoms, bonds):
    """The bond graph as a scipy sparse matrix, built here independently of the module."""
    b = np.asarray(bonds).reshape(-1, 2)
    return coo_matrix((np.ones(len(b)), (b[:, 0], b[:, 1])), shape=(n_atoms, n_atoms)).tocsr()


def _is_connected(A, mask):
    idx = np.flatnonzero(mask)
    return connected_components(A[idx][:, idx], directed=False)[0] == 1


def _parts_are_connected(n_atoms, bonds, labels):
    A = _adjacency(n_atoms, bonds)
    return all(_is_connected(A, labels == p) for p in range(labels.max() + 1))


def _fewest_cut_bonds(n_atoms, bonds, cap):
    """Brute force: the fewest bonds cut by any split into two connected sides of <= cap atoms."""
    A = _adjacency(n_atoms, bonds)
    b = np.asarray(bonds).reshape(-1, 2)
    b = np.unique(np.sort(b[b[:, 0] != b[:, 1]], axis=1), axis=0)
    codes = np.arange(1, 2 ** (n_atoms - 1))                     # atom n - 1 always on side 0
    sides = (codes[:, None] >> np.arange(n_atoms)) & 1
    size = sides.sum(1)
    cut = (sides[:, b[:, 0]] != sides[:, b[:, 1]]).sum(1)
    cut[(size > cap) | (n_atoms - size > cap)] = len(b) + 1
    for c in np.argsort(cut, kind="stable"):           # fewest cut first: the first connected one
        side = sides[c].astype(bool)
        if _is_connected(A, side) and _is_connected(A, ~side):
            return cut[c]


def test_partition_hand_checkable_graphs():
    import itertools
    cliques = [list(p) for p in itertools.combinations(range(5), 2)]
    bonds = cliques + [[a + 5, b + 5] for a, b in cliques] + [[4, 5]]
    labels = C.spectral_partition(10, bonds, 2)
    assert C.edge_cut(bonds, labels) == 1 and len(set(labels[:5])) == 1
    ring = [[i, (i + 1) % 10] for i in range(10)]
    labels = C.spectral_partition(10, ring, 2)
    assert C.edge_cut(ring, labels) == 2 and np.bincount(labels).tolist() == [5, 5]
    path = [[i, i + 1] for i in range(19)]
    labels = C.spectral_partition(20, path, 4)
    assert C.edge_cut(path, labels) == 3 and np.bincount(labels).tolist() == [5, 5, 5, 5]
    assert np.all(np.diff(labels) != 0) == False and np.count_nonzero(np.diff(labels)) == 3


def test_partition_properties_on_molecular_graphs():
    rng = np.random.default_rng(0)
    graphs = [C.branched_graph(300, rng), protein_like_graph(40, rng)]
    graphs += [(s.n_atoms, s.bonds) for s, _ in (C.random_polymer(c, rng) for c in (1, 2))]
    for n_atoms, bonds in graphs:
        for per_part in (4, 10):
            k = max(2, n_atoms // per_part)
            labels = C.spectral_partition(n_atoms, bonds, k)
            sizes = np.bincount(labels, minlength=k)
            assert sizes.min() >= 1 and len(sizes) == k
            assert _parts_are_connected(n_atoms, bonds, labels)
            cap = math.ceil(1.1 * n_atoms / k - 1e-9)
            # The cap holds wherever the molecule has balanced connected cuts; the branched
            # 300-atom one at 30 parts has too few (greedy tree packing needs more than 30 parts
            # of <= 11 atoms) and gets one atom over it.
            over = 1 if (n_atoms, k) == (300, 30) else 0
            assert sizes.max() <= cap + over, (n_atoms, k, sizes.max(), cap)
            again = C.spectral_partition(n_atoms, bonds, k)
            assert np.array_equal(labels, again)                 # deterministic


def test_partition_tolerates_self_loops_and_repeats_and_splits_components():
    rng = np.random.default_rng(3)
    n_atoms, bonds = C.branched_graph(120, rng)
    messy = np.concatenate([bonds, bonds[:10, ::-1], [[5, 5], [7, 7]]])
    assert np.array_equal(C.spectral_partition(n_atoms, bonds, 20),
                          C.spectral_partition(n_atoms, messy, 20))
    system, _ = C.electrolyte(4, 12, 24)
    labels = C.cg_mapping(system, atoms_per_bead=4)
    ions = np.flatnonzero(system.types >= 2)
    assert len(np.unique(labels[ions])) == len(ions)                 # every ion its own bead
    chain = labels[:12]
    assert len(np.unique(chain)) == 3 and not np.isin(chain, labels[12:]).any()
    assert _parts_are_connected(system.n_atoms, system.bonds, labels)


def test_two_part_cut_is_as_small_as_brute_force_on_small_graphs():
    # Fiedler halves and bridges compete as cuts: on small graphs with rings, the two-part split
    # cuts no more bonds than the best of all 2^(n-1) splits into connected sides under the cap.
    rng = np.random.default_rng(2)
    graphs = [(12, C.stiff_molecule()[0].bonds)]
    for _ in range(4):                                  # branched trees with three extra bonds
        n_atoms, bonds = C.branched_graph(16, rng)
        graphs.append((n_atoms, np.concatenate([bonds, rng.integers(0, n_atoms, (3, 2))])))
    for n_atoms, bonds in graphs:
        labels = C.spectral_partition(n_atoms, bonds, 2)
        cap = math.ceil(1.1 * n_atoms / 2 - 1e-9)
        assert _parts_are_connected(n_atoms, bonds, labels)
        assert np.bincount(labels).max() <= cap
        assert C.edge_cut(bonds, labels) <= _fewest_cut_bonds(n_atoms, bonds, cap)


def test_coarse_grain_is_exact_centre_of_mass_and_cg_bonds():
    x = np.array([[0.0, 0, 0], [2, 0, 0], [5, 1, 0], [5, 3, 0]])
    m = np.array([1.0, 3.0, 2.0, 2.0])
    labels = np.array([0, 0, 1, 1])
    beads = C.coarse_grain(x, labels, m)
    assert np.allclose(beads, [[1.5, 0, 0], [5, 2, 0]])
    assert np.allclose(C.bead_masses(labels, m), [4.0, 4.0])
    traj = np.stack([x, x + 1.0])                                     # [T, n, 3] batched
    assert np.allclose(C.coarse_grain(traj, labels, m)[1], beads + 1.0)
    bonds = [[0, 1], [1, 2], [2, 3], [3, 2], [0, 0]]
    assert C.cg_bonds(labels, bonds).tolist() == [[0, 1]]
    assert C.cg_bonds([0, 1, 2, 1], [[0, 1], [1, 2], [2, 3]]).tolist() == [[0, 1], [1, 2]]


def test_cg_graph_radius_edges_match_brute_force_with_images():
    rng = np.random.default_rng(4)
    box, radius, n = 6.0, 2.0, 40
    x = rng.uniform(-10, 10, (3, n, 3))                # unwrapped, several boxes away
    bonds = np.array([[0, 1], [1, 2], [5, 30]])
    g = C.cg_graph(torch.as_tensor(x), bonds, radius, box=box)
    shifts = box * np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    expected = set()
    for f in range(3):
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                xi, xj = np.mod(x[f, i], box), np.mod(x[f, j], box)   # then 27 images suffice
                d = np.min(np.linalg.norm(xi - xj + shifts, axis=1))
                bonded = {i, j} in ({0, 1}, {1, 2}, {5, 30})
                if bonded:                                 # bonds: unwrapped difference
                    d = np.linalg.norm(x[f, i] - x[f, j])
                if d < radius or bonded:
                    expected.add((f * n + i, f * n + j, int(bonded), round(d, 9)))
    got = set(zip(g.senders.tolist(), g.receivers.tolist(), g.edge_type.tolist(),
                  np.round(g.distance[:, 0].numpy(), 9).tolist()))
    assert got == expected
    assert torch.allclose(g.distance[:, 0], g.displacement.norm(dim=1))
    radius_edges = g.edge_type == 0
    assert float(g.distance[radius_edges].max()) < radius


def test_pair_graph_keeps_radius_edges_inside_molecules_and_all_bonds():
    system, cg, x = _two_polymers()
    xb = torch.as_tensor(C.coarse_grain(x, cg.labels, system.masses))[None]
    pairs = torch.as_tensor(cg.candidate_pairs())
    g = C.pair_graph(xb, pairs, torch.as_tensor(cg.cg_bonds), 2.5)
    s, r = g.senders.numpy(), g.receivers.numpy()
    assert np.all(cg.molecule[s] == cg.molecule[r])
    d = np.linalg.norm(xb[0].numpy()[s] - xb[0].numpy()[r], axis=1)
    bonded = {tuple(b) for b in cg.cg_bonds} | {tuple(b[::-1]) for b in cg.cg_bonds}
    expect = {(i, j) for i, j in cg.candidate_pairs()
              if np.linalg.norm(xb[0, i] - xb[0, j]) < 2.5 or (i, j) in bonded}
    assert set(zip(s.tolist(), r.tolist())) == expect
    assert np.allclose(g.distance[:, 0].numpy(), d)
    assert {(i, j) for i, j, t in zip(s, r, g.edge_type.numpy()) if t} == bonded


def test_batched_frames_equal_one_by_one():
    rng = np.random.default_rng(5)
    xa, ba = rng.normal(0, 2, (2, 10, 3)), np.array([[0, 1], [1, 2]])
    frames = C.cg_graph(xa, ba, 2.5)
    assert frames.n_nodes == 20
    for f in range(2):
        one = C.cg_graph(xa[f], ba, 2.5)
        sel = (frames.senders >= f * 10) & (frames.senders < (f + 1) * 10)
        assert torch.equal(frames.senders[sel] - f * 10, one.senders)
        assert torch.equal(frames.receivers[sel] - f * 10, one.receivers)
        assert torch.allclose(frames.displacement[sel], one.displacement)


def test_embedding_gnn_invariant_to_atom_relabelling():
    torch.manual_seed(0)
    system, _ = C.random_polymer(2, np.random.default_rng(7))
    labels = C.cg_mapping(system, 4)
    btypes = C.bond_types(system)
    gnn = C.EmbeddingGNN(C.EmbeddingConfig(n_atom_types=4, n_bond_types=int(btypes.max()) + 1,
                                           latent=16, n_steps=3)).double()
    n_beads = labels.max() + 1
    ref = gnn(system.types, system.bonds, btypes, labels, n_beads)
    perm = np.random.default_rng(8).permutation(system.n_atoms)      # new index of each atom
    inv = np.argsort(perm)
    out = gnn(system.types[inv], perm[system.bonds], btypes, labels[inv], n_beads)
    assert ref.shape == (n_beads, 16)
    assert torch.allclose(ref, out, atol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: C.spectral_partition(10, [[0, 1]], 11), "n_parts"),
    (lambda: C.spectral_partition(4, [[0, 1], [2, 3]], 1), "components"),
    (lambda: C.spectral_partition(4, [[0, 9]], 2), "bonds"),
    (lambda: C.coarse_grain(np.zeros((5, 3)), [0, 0, 1, 1], np.ones(5)), "labels"),
    (lambda: C.coarse_grain(np.zeros((4, 3)), [0, 0, 2, 2], np.ones(4)), "labels"),
    (lambda: C.cg_graph(np.zeros((4, 3)), [[0, 1]], 3.0, box=5.0), "radius"),
    (lambda: C.cg_mapping(POLYMER, 0), "atoms_per_bead"),
])
def test_coarse_graining_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §5 [A] Dynamics GNN: the learned CG simulator ----------------------------------------------

@pytest.mark.parametrize("correlated", [True, False])
def test_dynamics_mean_equivariant_std_invariant_under_rotation_and_translation(correlated):
    _, cg, _ = _two_polymers()
    model = _dynamics_model(correlated)
    h = _history(cg)
    Q = torch.as_tensor(Rotation.random(random_state=3).as_matrix())
    shift = torch.tensor([3.0, -7.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        d0 = model(h, cg)
        d1 = model(h @ Q.T + shift, cg)
    assert torch.allclose(d1.mean, d0.mean @ Q.T, atol=1e-10)
    assert torch.allclose(d1.std(), d0.std(), atol=1e-10)
    assert torch.allclose(d1.covariance(), d0.covariance(), atol=1e-10)
    # the sparse marginal std is the dense covariance's diagonal
    assert torch.allclose(d0.std(), torch.diagonal(d0.covariance(), dim1=1, dim2=2).sqrt(),
                          atol=1e-12)
    h[:, -1, 1] = h[:, -1, 0]                                  # two beads on one spot: finite
    with torch.no_grad():
        assert torch.isfinite(model(h, cg).mean).all()


def test_dynamics_permutation_equivariant():
    _, cg, _ = _two_polymers()
    model = _dynamics_model()
    h = _history(cg)
    perm = np.random.default_rng(1).permutation(cg.n_beads)
    inv = np.argsort(perm)                                               # new index of old bead
    cg_p = C.CGSystem(atom_types=cg.atom_types, bonds=cg.bonds, bond_type=cg.bond_type,
                      labels=inv[cg.labels], bead_mass=cg.bead_mass[perm],
                      cg_bonds=np.sort(inv[cg.cg_bonds], axis=1), molecule=cg.molecule[perm])
    with torch.no_grad():
        d0, d1 = model(h, cg), model(h[:, :, perm], cg_p)
    assert torch.allclose(d1.mean, d0.mean[:, perm], atol=1e-10)
    assert torch.allclose(d1.std(), d0.std()[:, perm], atol=1e-10)
    cov0 = d0.covariance()
    assert torch.allclose(d1.covariance(), cov0[:, perm][:, :, perm], atol=1e-10)


def test_dynamics_batched_equals_one_by_one():
    _, cg, _ = _two_polymers()
    model = _dynamics_model()
    h = _history(cg, B=3)
    with torch.no_grad():
        d = model(h, cg)
        for b in range(3):
            one = model(h[b:b + 1], cg)
            assert torch.allclose(d.mean[b], one.mean[0], atol=1e-12)
            assert torch.allclose(d.covariance()[b], one.covariance()[0], atol=1e-12)


def test_step_distribution_nll_matches_torch_distributions():
    _, cg, _ = _two_polymers()
    h = _history(cg, B=2)
    target = torch.randn(2, cg.n_beads, 3, dtype=torch.float64, generator=torch.Generator()
                         .manual_seed(5))
    with torch.no_grad():
        d = _dynamics_model(correlated=False)(h, cg)
        ref = -torch.distributions.Normal(d.mean, d.std()[..., None]).log_prob(target).mean()
        assert torch.allclose(d.nll(target), ref, atol=1e-10)
        d = _dynamics_model(correlated=True)(h, cg)
        cov = d.covariance()
        mvn = torch.distributions.MultivariateNormal(d.mean.transpose(1, 2),
                                                     covariance_matrix=cov[:, None])
        ref = -mvn.log_prob(target.transpose(1, 2)).sum() / target.numel()
        assert torch.allclose(d.nll(target), ref, atol=1e-10)
    # gaussian_nll on known values: N(0, 2^2) at x = 2 gives log 2 + log(2 pi)/2 + 1/2
    val = C.gaussian_nll(torch.zeros(1), torch.full((1,), 2.0), torch.full((1,), 2.0))
    assert float(val) == pytest.approx(math.log(2) + 0.5 * math.log(2 * math.pi) + 0.5)


def test_step_distribution_samples_have_its_covariance():
    """The sparse sampler (S z via the edge list) and the dense covariance agree: 4000 draws,
    tolerance 5 standard errors of a sample covariance (sqrt(2 / n) relative)."""
    _, cg, _ = _two_polymers()
    with torch.no_grad():
        d = _dynamics_model()(_history(cg, B=1), cg)
        gen = torch.Generator().manual_seed(0)
        a = torch.stack([d.sample(gen)[0] for _ in range(4000)])        # [S, n, 3]
    dev = (a - d.mean[0]).permute(0, 2, 1).reshape(-1, cg.n_beads)      # [S * 3, n]
    emp = dev.T @ dev / len(dev)
    cov = d.covariance()[0]
    scale = torch.sqrt(torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None])
    assert float(((emp - cov) / scale).abs().max()) < 5 * math.sqrt(2 / len(dev))
    assert float(cov[0, 1].abs()) > 0                                    # correlated for real


@pytest.mark.parametrize("noise", [1.0, 20.0])
def test_expected_rg2_matches_sampled_next_frames(noise):
    """expected_rg2 and rg2_variance (closed forms from the step's mean and dense covariance)
    against the mean and variance of R_g^2 over 4000 sampled next frames (radius_of_gyration_sq,
    a separate code path), per molecule and frame; tolerance 5 standard errors of each sample
    estimate. noise 1: the mean's term of the variance dominates, 20: the trace term does. The
    moment loss is zero when the observed R_g^2 equals the expected one, positive otherwise."""
    _, cg, _ = _two_polymers()
    h = _history(cg, B=2)
    with torch.no_grad():
        d = _dynamics_model()(h, cg)
        d.scale, d.edge_scale = noise * d.scale, noise * d.edge_scale
        expected = C.expected_rg2(d, h, cg)                                  # [B, 2]
        variance = C.rg2_variance(d, h, cg)                                  # [B, 2]
        gen = torch.Generator().manual_seed(1)
        nxt = torch.stack([C.euler_step(h[:, -2], h[:, -1], d.sample(gen)) for _ in range(4000)])
    for k in range(2):
        beads = cg.molecule == k
        rg2 = radius_of_gyration_sq(nxt[:, :, beads].numpy(), cg.bead_mass[beads])   # [S, B]
        se = rg2.std(0) / math.sqrt(len(rg2))
        assert np.all(np.abs(rg2.mean(0) - expected[:, k].numpy()) < 5 * se)
        dev = rg2 - rg2.mean(0)                        # variance: SE from the 4th moment
        se_var = np.sqrt(((dev ** 4).mean(0) - rg2.var(0) ** 2) / len(rg2))
        assert np.all(np.abs(rg2.var(0) - variance[:, k].numpy()) < 5 * se_var)
    assert float(d.covariance()[0, 0, 1].abs()) > 0                      # the correlated case
    assert float(C.rg2_moment_loss(d, h, nxt[0], cg)) > 0
    mean_next = C.euler_step(h[:, -2], h[:, -1], d.mean)                 # R_g^2(mean) only:
    zero_noise = C.StepDistribution(mean=d.mean, scale=torch.zeros_like(d.scale), edge_scale=None,
                                    graph=d.graph, std_min=0.0)
    assert float(C.rg2_moment_loss(zero_noise, h, mean_next, cg)) < 1e-20


def test_euler_bookkeeping_exact_in_a_rollout():
    """A model whose step distribution is a fixed acceleration: the rollout must be the exact
    constant-acceleration trajectory x_n = x_0 + n v + n (n + 1) / 2 a (dyadic numbers)."""
    _, cg, _ = _two_polymers()
    a = torch.full((1, cg.n_beads, 3), 0.25, dtype=torch.float64)

    class Fixed(C.DynamicsGNN):
        def forward(self, history, cg, embedding=None, pairs=None):
            return C.StepDistribution(mean=a.expand(len(history), -1, -1),
                                      scale=torch.zeros(len(history), cg.n_beads,
                                                        dtype=torch.float64),
                                      edge_scale=None, graph=None, std_min=0.0)

    model = Fixed(C.DynamicsConfig(n_history=1, latent=8, n_steps=1,
                                   embedding=C.EmbeddingConfig(latent=8, n_steps=1))).double()
    x0 = torch.zeros(1, cg.n_beads, 3, dtype=torch.float64)
    v = torch.full_like(x0, 0.5)
    frames = C.rollout(model, cg, torch.stack([x0 - v, x0], dim=1), 6)
    n = np.arange(7)[:, None, None, None]
    assert np.array_equal(frames, x0.numpy() + n * v.numpy() + n * (n + 1) / 2 * 0.25)
    xs = torch.as_tensor(frames[:3])
    assert torch.equal(C.time_integrated_acceleration(xs[0], xs[1], xs[2]), a.expand_as(xs[0]))
    # a sampled rollout: each replica draws its own noise; a seed repeats, another differs
    noisy, hist = _dynamics_model(), _history(cg, B=1).expand(2, -1, -1, -1)
    one, again, other = (C.rollout(noisy, cg, hist, 2, seed=s) for s in (0, 0, 1))
    assert not np.allclose(one[1:, 0], one[1:, 1]) and np.array_equal(one, again)
    assert not np.allclose(one[1:], other[1:])


@pytest.fixture(scope="module")
def tiny_data():
    """Two small class I polymers, two replicas, 61 CG frames: (CGSystem, [61, 2, n, 3])."""
    polymers = [C.random_polymer(1, np.random.default_rng(2)) for _ in range(2)]
    system, _ = C.concatenate_systems([p[0] for p in polymers])
    x = np.concatenate([p[1] for p in polymers])
    tr = C.simulate(system, np.stack([x, x]), 1200, dt=0.005, save_every=20, seed=0)
    cg = C.cg_system(system, 4.0)
    return cg, C.coarse_grain(tr.positions, cg.labels, system.masses)


@pytest.fixture(scope="module")
def tiny_trained(tiny_data):
    """A Dynamics GNN trained 60 iterations on tiny_data, and its NLL on four held-out steps."""
    cg, x = tiny_data
    cfg = C.DynamicsConfig(latent=16, n_steps=1, embedding=C.EmbeddingConfig(latent=16,
                                                                             n_steps=1))
    train = C.TrainConfig(stride=2, n_iterations=60, lr=3e-3, noise=(0.01, 0.001))
    h = torch.as_tensor(np.stack([x[t - 6:t + 1:2, r] for t in (20, 40) for r in (0, 1)]))
    target = C.time_integrated_acceleration(h[:, -2], h[:, -1],
                                            torch.as_tensor(np.stack(
                                                [x[t + 2, r] for t in (20, 40) for r in (0, 1)])))

    def nll(model):
        with torch.no_grad():
            return float(model(h.float(), cg).nll(target.float()))
    trained = C.train_dynamics(x, cg, cfg, train, label=None)
    return dict(cg=cg, x=x, cfg=cfg, train=train, h=h, nll=nll, trained=trained)


def test_tiny_training_lowers_the_loss_and_rollout_stays_finite(tiny_trained):
    cg, x, cfg, train, h, nll, trained = (tiny_trained[k] for k in
                                          ("cg", "x", "cfg", "train", "h", "nll", "trained"))
    untrained = C.train_dynamics(x, cg, cfg, C.TrainConfig(stride=2, n_iterations=1,
                                                                     lr=1e-12), label=None)
    assert nll(trained) < nll(untrained) - 0.2
    # with the R_g^2 moment term (beyond [A]) the fit still lowers the NLL
    moment = C.train_dynamics(x, cg, cfg, dataclasses.replace(train, rg2_weight=1.0), label=None)
    assert nll(moment) < nll(untrained) - 0.2 and nll(moment) != nll(trained)
    frames = C.rollout(trained, cg, h[:2], 200)
    assert frames.shape == (201, 2, cg.n_beads, 3) and np.isfinite(frames).all()


def test_training_keeps_the_weights_of_the_best_validation(tiny_data):
    cg, x = tiny_data
    cfg = C.DynamicsConfig(latent=8, n_steps=1, embedding=C.EmbeddingConfig(latent=8,
                                                                            n_steps=1))
    scores, states = iter([5.0, 1.0, 3.0, 4.0]), []

    def validate(model):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)
    model = C.train_dynamics(x, cg, cfg, C.TrainConfig(stride=2, n_iterations=20), label=None,
                             validate=validate, validate_every=5)
    assert model.selected_iteration == 10
    assert [it for it, _ in model.validation] == [5, 10, 15, 20]
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[1][k])
    assert not all(torch.equal(v, states[3][k]) for k, v in model.state_dict().items())


def test_training_validates_only_from_validate_from_on(tiny_data):
    cg, x = tiny_data
    cfg = C.DynamicsConfig(latent=8, n_steps=1, embedding=C.EmbeddingConfig(latent=8,
                                                                            n_steps=1))
    scores = iter([2.0, 3.0])
    model = C.train_dynamics(x, cg, cfg, C.TrainConfig(stride=2, n_iterations=20), label=None,
                             validate=lambda model: next(scores), validate_every=5,
                             validate_from=11)
    assert model.validation == [(15, 2.0), (20, 3.0)] and model.selected_iteration == 15


def test_training_repeats_bit_for_bit_with_two_threads():
    """reproducible_training: two trainings with the same seed on 2 threads give equal weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(0)
        polymers = [C.random_polymer(1, rng) for _ in range(24)]
        system = C.concatenate_systems([p[0] for p in polymers])[0]
        x = np.concatenate([p[1] for p in polymers])
        tr = C.simulate(system, x, 400, save_every=20, seed=2)
        cg = C.cg_system(system, 4)
        xc = C.coarse_grain(tr.positions, cg.labels, system.masses)[:, None]
        cfg = C.DynamicsConfig(n_history=1)
        train = C.TrainConfig(stride=2, n_iterations=60)
        runs = [C.train_dynamics(xc, cg, cfg, train, label=None).state_dict() for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class _GaussianStep(torch.nn.Module):
    """A stand-in Dynamics GNN whose step distribution is known: a_t ~ N(0, std^2) per
    coordinate, whatever the history (one-velocity history)."""

    def __init__(self, std):
        super().__init__()
        self.cfg = C.DynamicsConfig(n_history=1)
        self.std = torch.nn.Parameter(torch.tensor(float(std), dtype=torch.float64))
        self.register_buffer("vel_scale", torch.ones((), dtype=torch.float64))

    def forward(self, history, cg, embedding=None, pairs=None):
        B, _, n, _ = history.shape
        return C.StepDistribution(mean=torch.zeros(B, n, 3, dtype=torch.float64),
                                  scale=self.std.expand(B, n), edge_scale=None, graph=None,
                                  std_min=0.0)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 2.0])
def test_one_step_coverage_matches_the_normal_cdf(ratio):
    # frames whose accelerations a_t = x_{t+1} - 2 x_t + x_{t-1} are exactly N(0, 0.3^2): a model
    # predicting std 0.3 * ratio covers P(|z| < 1.96 ratio) of the coordinates
    rng = np.random.default_rng(0)
    a = 0.3 * rng.standard_normal((400, 3, 4, 3))
    x = np.cumsum(np.cumsum(a, axis=0), axis=0)                       # [F, R, n, 3]
    cov = C.one_step_coverage(_GaussianStep(0.3 * ratio), _free_beads(4), x, 1,
                              n_samples=2000, seed=1)
    for q in (0.5, 0.95):
        expected = 2 * scipy.stats.norm.cdf(scipy.stats.norm.ppf(0.5 + q / 2) * ratio) - 1
        # binomial error of the 1194 distinct windows (3 x 398) plus that of drawing 2000 of
        # them with replacement, 12 coordinates each; 5 standard errors
        se = np.sqrt(expected * (1 - expected) / 12 * (1 / 1194 + 1 / 2000))
        assert abs(cov["coverage"][str(q)] - expected) < 5 * se + 1e-3
    assert abs(cov["mean_z2"] - ratio ** -2) < 0.1 * ratio ** -2


def test_one_step_coverage_of_rg2_under_an_exact_gaussian():
    """The same frames as one molecule of 4 beads: under the exact Gaussian step the next R_g^2
    has mean z^2 1 (expected_rg2, rg2_variance); a step twice too wide gives 1/16-1/4. z^2 has
    variance ~2.3 here (measured over all 1194 windows); 2000 draws with replacement from them
    give a standard error of ~0.055, so 5 standard errors are ~0.28."""
    rng = np.random.default_rng(0)
    x = np.cumsum(np.cumsum(0.3 * rng.standard_normal((400, 3, 4, 3)), axis=0), axis=0)
    cg = dataclasses.replace(_free_beads(4), molecule=np.zeros(4, dtype=np.int64))
    z2 = [C.one_step_coverage(_GaussianStep(std), cg, x, 1, n_samples=2000,
                              seed=1)["rg2_mean_z2"] for std in (0.3, 0.6)]
    assert abs(z2[0] - 1) < 0.28
    assert z2[1] < 0.5
    assert C.one_step_coverage(_GaussianStep(0.3), _free_beads(4), x, 1)["rg2_mean_z2"] is None


def test_rollout_names_the_step_where_it_blows_up():
    _, cg, _ = _two_polymers()
    model = _dynamics_model()
    model.acc_scale.fill_(float("inf"))
    with pytest.raises(C.SimulationBlowUp, match="step 1"):
        C.rollout(model, cg, _history(cg, B=1), 5)


def test_rg2_regressor_fits_its_training_molecules():
    rng = np.random.default_rng(4)
    system, _ = C.concatenate_systems([C.random_polymer(1, rng)[0] for _ in range(6)])
    target = np.bincount(system.molecule).astype(float) ** 0.8 / 4      # grows with size
    model = C.train_rg2_regressor(system, target, n_iterations=200)
    with torch.no_grad():
        pred = torch.exp(model(system)).numpy()
    assert np.max(np.abs(pred / target - 1)) < 0.1


@pytest.mark.parametrize("call, match", [
    (lambda m, cg, h: m(h[:, 1:], cg), "n_history"),
    (lambda m, cg, h: m(h, cg).nll(torch.zeros(1, 3)), "target"),
    (lambda m, cg, h: C.DynamicsConfig(radius=-1.0), "radius"),
    (lambda m, cg, h: C.rollout(m, cg, h[0], 3), "history"),
    (lambda m, cg, h: C.rollout(m, cg, h, 0), "n_steps"),
    (lambda m, cg, h: C.train_dynamics(np.zeros((5, 1, cg.n_beads, 3)), cg, m.cfg), "frames"),
    (lambda m, cg, h: C.train_dynamics(np.zeros((50, 1, cg.n_beads, 3)), cg, m.cfg,
                                       C.TrainConfig(rg2_weight=-1.0)), "rg2_weight"),
    (lambda m, cg, h: C.train_dynamics(np.zeros((50, 1, cg.n_beads, 3)), cg, m.cfg,
                                       C.TrainConfig(n_iterations=5), validate_from=6),
     "validate_from"),
    (lambda m, cg, h: C.one_step_coverage(m, cg, np.zeros((2, 1, cg.n_beads, 3)), 1), "frames"),
])
def test_dynamics_gnn_bad_input(call, match):
    _, cg, _ = _two_polymers()
    with pytest.raises(ValueError, match=match):
        call(_dynamics_model(), cg, _history(cg))


# ---- §6 [A] Score GNN: denoising score matching, annealed Langevin refinement -------------------

def _random_walk(n_frames=200, n_replicas=4, n_beads=16, step=0.5, seed=0):
    """Frames [F, R, n, 3] of independent Gaussian random walks: p(x_{t+1} | x_t) =
    N(x_t, step^2)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(step * rng.standard_normal((n_frames, n_replicas, n_beads, 3)), axis=0)


@pytest.fixture(scope="module")
def gaussian_score():
    """A Score GNN trained on random walks (step 0.5): its exact score is
    -(x - x_t) / (0.25 + s^2)."""
    x, cg = _random_walk(), _free_beads(16)
    cfg = C.ScoreConfig(latent=16, n_steps=1, sigmas=(1.0, 0.05), n_levels=10,
                        embedding=C.EmbeddingConfig(latent=8, n_steps=1))
    train = C.TrainConfig(stride=1, batch_size=16, n_iterations=800, lr=3e-3, lr_final=3e-4,
                          noise=(1e-4, 1e-5), seed=1)
    return C.train_score(x, cg, cfg, train, label=None), cg


def test_score_gnn_learns_the_closed_form_score_of_gaussian_steps(gaussian_score):
    model, cg = gaussian_score
    hist = torch.as_tensor(_random_walk(n_frames=2, n_replicas=64, seed=5)).transpose(0, 1)
    g = torch.Generator().manual_seed(0)
    for sigma in (1.0, 0.5, 0.3):     # lambda = sigma^2 weighs small sigma little: not tested
        x = hist[:, -1] + math.sqrt(0.25 + sigma ** 2) * torch.randn(
            hist[:, -1].shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            s = model(x.float(), hist.float(), sigma, cg).double()
        exact = -(x - hist[:, -1]) / (0.25 + sigma ** 2)
        assert float((s - exact).norm() / exact.norm()) < 0.1, sigma


def test_annealed_langevin_reproduces_the_gaussian_variance():
    """p(x) = N(0, v): exact score -x/v; the chain ends near variance v + sigma_L^2 (its
    smoothing). 40 steps a level leave the last levels not fully relaxed: +3% here (400 steps:
    +1.5%), inside the 5 SE + 1% slack; Langevin's own step bias is ~0.1%."""
    v, sig = 0.25, np.geomspace(1.0, 0.05, 10)
    x0 = 3.0 * torch.randn(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = C.annealed_langevin(lambda x, s: -x / (v + s ** 2), x0, sig, n_steps_each=40,
                              step_size=0.2 * 0.05 ** 2,
                              generator=torch.Generator().manual_seed(2))
    target = v + 0.05 ** 2
    se = target * math.sqrt(2 / len(out))                    # SE of a Gaussian sample variance
    assert abs(float(out.var()) - target) < 5 * se + 0.01 * target


def test_annealed_langevin_with_the_trained_score_reproduces_the_variance(gaussian_score):
    model, cg = gaussian_score
    hist = torch.as_tensor(_random_walk(n_frames=2, n_replicas=200, seed=7)).transpose(0, 1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = C.annealed_langevin(lambda y, s: model(y, hist.float(), s, cg),
                                hist[:, -1].float(), np.geomspace(1.0, 0.05, 10),
                                n_steps_each=20, step_size=0.2 * 0.05 ** 2, generator=g)
    var = float(((x.double() - hist[:, -1]) ** 2).mean())
    assert abs(var / (0.25 + 0.05 ** 2) - 1) < 0.1


def test_score_gnn_is_rotation_equivariant_and_translation_invariant():
    _, cg, _ = _two_polymers()
    torch.manual_seed(0)
    model = C.ScoreGNN(C.ScoreConfig(latent=16, n_steps=2, radius=3.0)).double().eval()
    h = _history(cg, K=1)
    x = h[:, -1] + 0.2 * torch.randn(h[:, -1].shape, dtype=torch.float64)
    Q = torch.as_tensor(Rotation.random(random_state=5).as_matrix())
    shift = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    with torch.no_grad():
        s = model(x, h, 0.3, cg)
        s_rot = model(x @ Q.T + shift, h @ Q.T + shift, 0.3, cg)
    assert float(s.abs().max()) > 1e-3                   # not trivially zero
    assert torch.allclose(s_rot, s @ Q.T, atol=1e-10)


@pytest.fixture(scope="module")
def electrolyte_score():
    """A Score GNN trained for a few seconds on a small CG electrolyte trajectory."""
    system, x = small_electrolyte()
    tr = C.simulate(system, x, 4000, dt=0.005, save_every=100, seed=1)
    cg = C.cg_system(system, 4.0)
    xs = C.coarse_grain(tr.positions, cg.labels, system.masses)[:, None]
    cfg = C.ScoreConfig(latent=16, n_steps=2, radius=2.0, sigmas=(1.0, 0.05), n_levels=10)
    train = C.TrainConfig(stride=2, batch_size=8, n_iterations=250, lr=3e-3, seed=0)
    return C.train_score(xs, cg, cfg, train, label=None), cg, xs


def test_refinement_separates_two_overlapping_beads(electrolyte_score):
    model, cg, xs = electrolyte_score
    species = C.bead_species(cg)
    ions = np.flatnonzero(species != "polymer")
    hist = torch.as_tensor(xs[-5:-1:2, 0], dtype=torch.float32)[None]   # [1, 2, n, 3]
    frame = hist[0, -1].clone()
    i, j = ions[0], ions[1]
    def minimum_image(d):
        return d - cg.box * torch.round(d / cg.box)
    d = minimum_image(frame[j] - frame[i])
    frame[j] = frame[i] + 0.3 * d / d.norm()              # j on top of i: 0.3 sigma apart
    R = 16
    start = frame.repeat(R, 1, 1)
    ref = C.RefineConfig(sigmas=(0.5, 0.1), n_levels=6, step_size=5e-3, denoise=True)

    def separation(score):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            out = C.annealed_langevin(score, start, ref.levels(), step_size=ref.step_size,
                                      denoise=True, generator=g)
        return minimum_image(out[:, j] - out[:, i]).norm(dim=-1)
    refined = separation(lambda y, s: model(y, hist.expand(R, -1, -1, -1), s, cg))
    noise_only = separation(lambda y, s: torch.zeros_like(y))
    assert float(refined.median()) > 0.8                 # no longer a collision
    assert float(refined.median()) > float(noise_only.median()) + 0.2


def test_rollout_with_langevin_refinement_stays_finite():
    _, cg, _ = _two_polymers()
    score = C.ScoreGNN(C.ScoreConfig(latent=8, n_steps=1, n_history=2)).double()
    dyn = _dynamics_model()                               # n_history 3 >= 2: fine
    frames = C.rollout(dyn, cg, _history(cg, K=3), 1, refine=C.langevin_refiner(score, cg))
    assert frames.shape == (2, 2, cg.n_beads, 3) and np.isfinite(frames).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_dynamics_and_score_gnns_train_and_roll_out_on_cuda(tiny_data):
    cg, x = tiny_data
    small = dict(latent=8, n_steps=1, embedding=C.EmbeddingConfig(latent=8, n_steps=1))
    train = C.TrainConfig(stride=2, n_iterations=3)
    dyn = C.train_dynamics(x, cg, C.DynamicsConfig(**small), train, device="cuda", label=None)
    score = C.train_score(x, cg, C.ScoreConfig(n_history=1, **small), train, device="cuda",
                          label=None)
    frames = C.rollout(dyn, cg, x[None, 0:8:2, 0], 2, refine=C.langevin_refiner(score, cg))
    assert frames.shape == (3, 1, cg.n_beads, 3) and np.isfinite(frames).all()

def test_checkpoint_round_trip_and_refusals(tmp_path, tiny_trained):
    trained, cfg, nll = tiny_trained["trained"], tiny_trained["cfg"], tiny_trained["nll"]
    path = tmp_path / "dyn.pt"
    C.save_checkpoint(path, trained)
    back = C.load_checkpoint(path, expected_config=cfg)
    for (k, v), (k2, v2) in zip(trained.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert nll(back) == nll(trained)
    # refusals need a file on disk, so they sit here rather than in the table below
    other = C.DynamicsConfig(latent=32, n_steps=1, embedding=C.EmbeddingConfig(latent=16,
                                                                               n_steps=1))
    with pytest.raises(ValueError, match="latent"):
        C.load_checkpoint(path, expected_config=other)
    score = C.ScoreGNN(C.ScoreConfig(latent=8, n_steps=1,
                                     embedding=C.EmbeddingConfig(latent=8, n_steps=1)))
    C.save_checkpoint(tmp_path / "score.pt", score)
    back = C.load_checkpoint(tmp_path / "score.pt", expected_config=score.cfg)
    assert isinstance(back, C.ScoreGNN) and all(torch.equal(a, b) for a, b in zip(
        score.state_dict().values(), back.state_dict().values()))
    torch.save({"kind": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a DynamicsGNN or ScoreGNN checkpoint"):
        C.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("call, match", [
    (lambda s, cg, h: s(h[:, -1, :-1], h, 0.1, cg), "expected"),
    (lambda s, cg, h: C.rollout(C.DynamicsGNN(C.DynamicsConfig(n_history=1, latent=8, n_steps=1))
                                .double(), cg, h[:, 1:], 1, refine=C.langevin_refiner(s, cg)),
     "n_history"),
    (lambda s, cg, h: C.annealed_langevin(lambda y, sig: y, torch.zeros(3), [0.1, 0.5]),
     "decreasing"),
    (lambda s, cg, h: C.annealed_langevin(lambda y, sig: y, torch.zeros(3), [0.5, 0.1],
                                          step_size=0.0), "step_size"),
    (lambda s, cg, h: C.RefineConfig(step_size=-1e-3), "step_size"),
    (lambda s, cg, h: C.RefineConfig(noise_scale=1.5), "noise_scale"),
    (lambda s, cg, h: C.RefineConfig(sigmas=(0.1, 0.1)), "decreasing"),
    (lambda s, cg, h: C.ScoreConfig(sigmas=(0.01, 1.0)), "decreasing"),
    (lambda s, cg, h: C.train_score([np.zeros((30, 1, 4, 3))], [_free_beads(4), _free_beads(4)]),
     "one array per system"),
    (lambda s, cg, h: C.train_score(np.zeros((30, 1, 4, 3)), _free_beads(5)), "beads"),
])
def test_score_gnn_bad_input(call, match):
    _, cg, _ = _two_polymers()
    score = C.ScoreGNN(C.ScoreConfig(latent=8, n_steps=1, n_history=2)).double()
    with pytest.raises(ValueError, match=match):
        call(score, cg, _history(cg, K=2))


# ---- §7 [B] bi-directional interpolation --------------------------------------------------------

def random_model(n_atoms=4, bidirectional=True, seed=0):
    """An untrained interpolator with a non-zero head (so the network really moves the state)."""
    torch.manual_seed(seed)
    model = C.BiLSTMInterpolator(C.InterpolatorConfig(n_atoms=n_atoms, hidden=16,
                                                  bidirectional=bidirectional))
    torch.nn.init.normal_(model.head.weight, std=0.3)
    torch.nn.init.normal_(model.head.bias, std=0.3)
    return model.eval()


def oscillator_segments(n_segments, gap, omega, dt, seed):
    """Exact 3-D isotropic harmonic oscillator segments, [S, gap + 1, 1, 3] positions/velocities."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 1.5, (n_segments, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, (n_segments, 1, 1, 3))
    t = dt * np.arange(gap + 1)[None, :, None, None]
    return amp * np.cos(omega * t + phase), -amp * omega * np.sin(omega * t + phase)


def test_blend_pins_both_ends_for_any_network():
    model = random_model()
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    fwd, bwd = model.passes(z0, z1, 7)
    assert not torch.allclose(fwd, bwd)                   # the untrained passes disagree ...
    z = model(z0, z1, 7)
    assert z.shape == (5, 8, 24)
    assert torch.equal(z[:, 0], z0) and torch.equal(z[:, -1], z1)   # ... yet both ends are exact
    # Through the numpy API (z-scoring round trip in float32, coordinates ~1): below 1e-6.
    rng = np.random.default_rng(2)
    start = (rng.normal(size=(3, 4, 3)), rng.normal(size=(3, 4, 3)))
    end = (rng.normal(size=(3, 4, 3)), rng.normal(size=(3, 4, 3)))
    pos, vel = model.interpolate(start, end, 9)
    assert pos.shape == vel.shape == (3, 10, 4, 3)
    for got, want in [(pos[:, 0], start[0]), (vel[:, 0], start[1]), (pos[:, -1], end[0]),
                      (vel[:, -1], end[1])]:
        assert np.abs(got - want).max() < 1e-6


def test_unidirectional_variant_starts_exactly_and_ignores_the_end():
    model = random_model(bidirectional=False)
    g = torch.Generator().manual_seed(3)
    z0, z1, z2 = (torch.randn(4, 24, generator=g) for _ in range(3))
    a, b = model(z0, z1, 6), model(z0, z2, 6)
    assert torch.equal(a[:, 0], z0) and torch.equal(a, b)     # forward only: t1 not used
    assert not torch.allclose(a[:, -1], z1)


def test_adiabatic_blend_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    fwd, bwd = rng.normal(size=(11, 4, 3)), rng.normal(size=(11, 4, 3))
    x = C.adiabatic_blend(fwd, bwd, time_axis=0)
    assert np.array_equal(x[0], fwd[0]) and np.array_equal(x[-1], bwd[-1])
    assert np.allclose(x[5], 0.5 * (fwd[5] + bwd[5]))    # lambda = 1/2 half way
    xt = C.adiabatic_blend(torch.from_numpy(fwd), torch.from_numpy(bwd), time_axis=0)
    assert np.allclose(xt.numpy(), x, atol=1e-15)


class VerletOscillator(C.BiLSTMInterpolator):
    """The network's step replaced by velocity Verlet for x'' = -omega^2 x (in z-space).

    Verlet is exactly time-reversible (negate v, step, negate v: the step undone), so a backward
    pass from the forward pass's own end state must retrace it, and the blend must equal it.
    """

    def __init__(self, omega, h):
        super().__init__(C.InterpolatorConfig(n_atoms=1, hidden=4))
        self.omega, self.h = omega, h

    def step(self, z, hc):
        x, v = z[:, :3], z[:, 3:]
        v = v - 0.5 * self.h * self.omega ** 2 * x
        x = x + self.h * v
        v = v - 0.5 * self.h * self.omega ** 2 * x
        return torch.cat([x, v], 1), hc


def test_backward_pass_of_a_reversible_step_retraces_the_forward_one():
    model = VerletOscillator(omega=2 * math.pi / 17, h=1.0)     # period 17 steps, as C-H
    z0 = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = model.rollout(z0, 30)                               # 30 steps: > one period
    fwd, bwd = model.passes(truth[:, 0], truth[:, -1], 30)
    assert torch.allclose(fwd, truth, atol=1e-12)
    assert torch.allclose(bwd, truth, atol=1e-12)               # backward retraces forward
    assert torch.allclose(model(truth[:, 0], truth[:, -1], 30), truth, atol=1e-12)
    # Without the velocity flip the "backward" pass would run forward in time and miss.
    wrong = model.rollout(truth[:, -1], 30).flip(1)
    assert (wrong - truth).abs().max() > 0.1
    # The interpolator's time reversal flips velocities and keeps positions (through z-scoring).
    net, rng = random_model(), np.random.default_rng(3)
    p, v = rng.normal(1.0, 1.0, (10, 4, 3)), rng.normal(0.0, 1.0, (10, 4, 3))
    net.fit_normalization(p, v)
    p2, v2 = net.decode(net.time_reverse(net.encode(p, v)))
    assert np.allclose(p2, p, atol=1e-5) and np.allclose(v2, -v, atol=1e-5)


def test_hermite_reproduces_a_cubic_exactly():
    rng = np.random.default_rng(0)
    a, b, c, d = rng.normal(size=(4, 5, 3))                     # per atom and coordinate
    t = np.linspace(0.3, 1.1, 9)
    x = lambda s: a + b * s + c * s ** 2 + d * s ** 3           # noqa: E731
    v = lambda s: b + 2 * c * s + 3 * d * s ** 2                # noqa: E731
    got = C.hermite_interpolation(x(t[0]), v(t[0]), x(t[-1]), v(t[-1]), t)
    assert got.shape == (9, 5, 3)
    assert np.allclose(got, np.stack([x(s) for s in t]), atol=1e-12)


def test_linear_interpolation_reproduces_a_line():
    rng = np.random.default_rng(1)
    start, velocity = rng.normal(size=(2, 5, 3))
    got = C.linear_interpolation(start, start + 20 * velocity, 21)
    assert got.shape == (21, 5, 3)
    assert np.allclose(got, start + np.arange(21)[:, None, None] * velocity, atol=1e-12)
    assert np.array_equal(got[0], start) and np.array_equal(got[-1], start + 20 * velocity)


def test_segment_frame_recovers_a_known_rigid_motion():
    _, ref = C.stiff_molecule()
    masses = C.stiff_molecule()[0].masses
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))                              # a proper rotation
    moved = ref @ q.T + np.array([4.0, -2.0, 7.0])
    com, rot = C.segment_frames(moved[None], moved[None], masses, ref)
    assert np.isclose(np.linalg.det(rot[0]), 1.0)
    pos = np.stack([moved, moved + 0.01])[None]                 # [1, 2, 12, 3]
    vel = rng.normal(size=pos.shape)
    p, v = C.to_frame(pos, vel, com, rot)
    ref_c = ref - masses @ ref / masses.sum()
    assert np.allclose(p[0, 0], ref_c, atol=1e-12)              # aligned onto the reference
    back = C.from_frame(p, v, com, rot)
    assert np.allclose(back[0], pos, atol=1e-12) and np.allclose(back[1], vel, atol=1e-12)


def test_briefly_trained_bilstm_beats_linear_on_a_harmonic_oscillator():
    # Period 12 steps, gap 10: the straight line misses almost the whole oscillation.
    omega, dt, gap = 2 * np.pi / (12 * 0.05), 0.05, 10
    pos, vel = oscillator_segments(384, gap, omega, dt, seed=0)
    test_pos, test_vel = oscillator_segments(64, gap, omega, dt, seed=1)
    model = C.train_interpolator(pos, vel, C.InterpolatorConfig(n_atoms=1, hidden=32),
                               C.InterpTrainConfig(teacher_epochs=2, epochs=6, batch_size=32,
                                                 lr=1e-2, seed=0), label="[oscillator]")
    p, _ = model.interpolate((test_pos[:, 0], test_vel[:, 0]), (test_pos[:, -1], test_vel[:, -1]),
                             gap)
    lin = np.moveaxis(C.linear_interpolation(test_pos[:, 0], test_pos[:, -1], gap + 1), 0, 1)
    inner = slice(1, gap)
    mae_lstm = np.abs(p[:, inner] - test_pos[:, inner]).mean()
    mae_lin = np.abs(lin[:, inner] - test_pos[:, inner]).mean()
    print(f"harmonic oscillator, gap {gap}: MAE Bi-LSTM {mae_lstm:.4f}, linear {mae_lin:.4f}")
    assert mae_lstm < 0.5 * mae_lin


P, V = np.zeros((12, 3)), np.ones((12, 3))


@pytest.mark.parametrize("call, match", [
    (lambda m: C.linear_interpolation(P, P, 2), "n_frames"),                 # gap of 1 frame
    (lambda m: C.linear_interpolation(P, P[:11], 5), "end"),                 # mismatched ends
    (lambda m: C.hermite_interpolation(P, V, P, V, [0.0, 2.0, 1.0]), "times"),
    (lambda m: C.hermite_interpolation(P, V[:11], P, V, [0.0, 0.5, 1.0]), "v0"),
    (lambda m: m.interpolate((P, V), (P, V), 1), "gap"),
    (lambda m: m.interpolate(P, (P, V), 5), r"start must be a \(positions, velocities\)"),
    (lambda m: m.interpolate((P, V), P, 5), r"end must be a \(positions, velocities\)"),
    (lambda m: m.interpolate((P, V[:11]), (P, V), 5), "velocities"),
    (lambda m: m.interpolate((P, V), (P[:11], V[:11]), 5), "end"),
    (lambda m: m.interpolate((P[:, :2], V[:, :2]), (P[:, :2], V[:, :2]), 5), "positions"),
    (lambda m: m.interpolate((np.stack([P, P]), np.stack([V, V])), (P, V), 5), "end"),
    (lambda m: C.train_interpolator(np.zeros((4, 6, 12, 3)), np.zeros((4, 5, 12, 3))),
     "velocities"),
    (lambda m: C.train_interpolator(np.zeros((4, 2, 12, 3)), np.zeros((4, 2, 12, 3))), "gap"),
])
def test_interpolation_bad_input(call, match):
    model = random_model(n_atoms=12)
    with pytest.raises(ValueError, match=match):
        call(model)


# ---- §8 estimators with known answers -----------------------------------------------------------

def ar1(phi, n, seed):
    """Stationary AR(1) series x_{k+1} = phi x_k + sqrt(1-phi^2) noise.

    Unit stationary variance; autocorrelation phi^k.  ``lfilter`` runs the
    recursion in C; the initial state is drawn from the stationary law.
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=n)
    x, _ = lfilter([np.sqrt(1 - phi ** 2)], [1.0, -phi], noise,
                   zi=[phi * rng.normal()])
    return x


def brownian(D, dt, n_frames, n_atoms, seed):
    """Unwrapped Brownian trajectory: steps ~ N(0, sqrt(2 D dt)) per axis."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, np.sqrt(2 * D * dt), size=(n_frames, n_atoms, 3))
    steps[0] = 0.0
    return np.cumsum(steps, axis=0)


def test_rg_two_equal_masses():
    d = 2.5
    pos = np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]])
    assert radius_of_gyration_sq(pos, [1.0, 1.0]) == pytest.approx(d ** 2 / 4)


def test_rg_ring_and_octahedron_radius_R():
    R = 1.7
    phi = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring = R * np.stack([np.cos(phi), np.sin(phi), np.zeros_like(phi)], 1)
    octa = R * np.concatenate([np.eye(3), -np.eye(3)])
    assert radius_of_gyration_sq(ring, np.ones(12)) == pytest.approx(R ** 2)
    assert radius_of_gyration_sq(octa, np.ones(6)) == pytest.approx(R ** 2)


def test_rg_unequal_masses():
    # m = (1, 3) at distance d: centre of mass 3d/4 from atom 0, so
    # R_g^2 = (1 (3d/4)^2 + 3 (d/4)^2) / 4 = 3 d^2 / 16.
    d = 2.0
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, d]])
    assert radius_of_gyration_sq(pos, [1.0, 3.0]) == pytest.approx(3 * d ** 2 / 16)


def test_rg_invariant_under_rigid_motion_and_batched():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(10, 3))
    masses = rng.uniform(0.5, 2.0, size=10)
    rot = Rotation.random(random_state=1).as_matrix()
    moved = pos @ rot.T + np.array([5.0, -3.0, 1.0])
    batch = np.stack([pos, moved])                       # [2, n, 3]
    rg2 = radius_of_gyration_sq(batch, masses)
    assert rg2.shape == (2,)
    assert rg2[1] == pytest.approx(rg2[0], rel=1e-12)


def test_acf_matches_direct_sum_and_is_one_at_zero():
    x = np.random.default_rng(2).normal(size=64)
    acf = autocorrelation(x)
    dx = x - x.mean()
    n = len(x)
    direct = np.array([dx[: n - k] @ dx[k:] / (n - k) for k in range(n)])
    assert acf[0] == 1.0                                 # exact by construction
    np.testing.assert_allclose(acf, direct / direct[0], atol=1e-12)


def test_acf_of_ar1_is_exponential():
    dt, tau = 0.1, 1.0
    phi = np.exp(-dt / tau)
    n = 200_000
    acf = autocorrelation(ar1(phi, n, seed=3))
    lags = np.arange(31)                                 # up to 3 tau
    # Bartlett: std of the ACF estimate <~ sqrt(2 tau / T_total) =
    # sqrt(2 * 10 steps / 2e5) = 0.010; 4 sigma covers the max over 31 lags.
    assert np.max(np.abs(acf[lags] - phi ** lags)) < 0.04


def test_relaxation_time_of_ar1():
    dt, tau = 0.1, 1.0
    x = ar1(np.exp(-dt / tau), 200_000, seed=4)
    # Integrated-time error (Sokal): sqrt(2 (2M+1) / T) with the cut-off
    # M ~ 46 lags -> ~3 % (3.7 % measured over 30 seeds); the dropped tail
    # beyond the zero crossing is ~1 %.  Tolerance 15 % ~ 4 sigma.
    assert relaxation_time(x, dt) == pytest.approx(tau, rel=0.15)


def test_msd_fft_equals_brute_force():
    rng = np.random.default_rng(5)
    pos = np.cumsum(rng.normal(size=(60, 4, 3)), axis=0) + 100.0
    msd = mean_squared_displacement(pos)
    n = len(pos)
    brute = np.array([np.mean(np.sum((pos[k:] - pos[: n - k]) ** 2, -1))
                      for k in range(n)])
    assert msd.shape == (n,) and msd[0] == 0.0
    np.testing.assert_allclose(msd, brute, rtol=0, atol=1e-10)


def test_msd_and_diffusion_of_brownian_motion():
    D, dt = 0.5, 0.01
    pos = brownian(D, dt, n_frames=200, n_atoms=1000, seed=6)
    msd = mean_squared_displacement(pos)
    lags = np.arange(1, 21)
    # Time-averaged MSD of 1-D Brownian motion has relative variance
    # ~ (4/3) k / T; with 3 axes x 1000 particles at k/T = 0.1 the relative
    # std is sqrt(0.133 / 3000) = 0.7 %.  Tolerance 3 % ~ 4 sigma.
    np.testing.assert_allclose(msd[lags], 6 * D * lags * dt, rtol=0.03)
    # Slope over the [0.2, 0.6] window: relative std measured 6.3 % for
    # 200 particles (40 seeds), scaling as 1/sqrt(n) -> 2.8 % for 1000.
    # Tolerance 12 % ~ 4 sigma.
    assert diffusion_coefficient(pos, dt) == pytest.approx(D, rel=0.12)


def test_rdf_ideal_gas_same_species():
    box, n_frames, n_atoms, r_max, n_bins = 10.0, 50, 200, 5.0, 20
    rng = np.random.default_rng(7)
    pos = rng.uniform(0, box, size=(n_frames, n_atoms, 3))
    r, g = radial_distribution(pos, box, r_max, n_bins)
    edges = np.linspace(0, r_max, n_bins + 1)
    np.testing.assert_allclose(r, 0.5 * (edges[1:] + edges[:-1]))
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    # Expected UNORDERED pair count per bin (each is counted twice in g):
    unordered = n_frames * n_atoms * (n_atoms - 1) / 2 / box ** 3 * shell
    # Poisson: relative std of g is 1 / sqrt(unordered count) (12 % in the
    # first bin, falling as 1 / r further out); allow 4 sigma per bin.
    np.testing.assert_array_less(np.abs(g - 1), 4 / np.sqrt(unordered))


def test_rdf_ideal_gas_cross_species():
    box, n_frames, r_max, n_bins = 10.0, 50, 5.0, 20
    rng = np.random.default_rng(8)
    a = rng.uniform(0, box, size=(n_frames, 100, 3))
    b = rng.uniform(-box, 2 * box, size=(n_frames, 150, 3))   # unwrapped
    _, g = radial_distribution(a, box, r_max, n_bins, positions_b=b)
    edges = np.linspace(0, r_max, n_bins + 1)
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    expected = n_frames * 100 * 150 / box ** 3 * shell    # a-b pair counts
    # Poisson: relative std 1 / sqrt(expected count); 4 sigma per bin.
    np.testing.assert_array_less(np.abs(g - 1), 4 / np.sqrt(expected))


def test_rdf_matches_brute_force_single_frame():
    box, r_max, n_bins = 6.0, 3.0, 12
    pos = np.random.default_rng(9).uniform(0, box, size=(30, 3))
    d = pos[:, None] - pos[None]
    d -= box * np.round(d / box)
    dist = np.linalg.norm(d, axis=-1)[~np.eye(30, dtype=bool)]  # ordered
    counts, edges = np.histogram(dist, bins=n_bins, range=(0, r_max))
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    _, g = radial_distribution(pos, box, r_max, n_bins)
    np.testing.assert_allclose(g, counts / (30 * 29 / box ** 3 * shell))


def test_rdf_uses_minimum_image():
    box = 10.0
    # 9.3 apart in x directly, i.e. 0.7 through the boundary.
    pos = np.array([[0.3, 5.0, 5.0], [9.6, 5.0, 5.0]])
    _, g = radial_distribution(pos, box, r_max=5.0, n_bins=10)
    assert np.flatnonzero(g).tolist() == [1]             # bin [0.5, 1.0)


def test_collision_rate_hand_made():
    # Pairs closer than 1: (0,1) at 0.5 and (2,3) at 0.8 -> 2 of 10 pairs.
    # (1,4) is at exactly 1.0: "closer than" is strict, so not counted.
    pos = np.array([[0, 0, 0], [0.5, 0, 0], [3, 0, 0], [3.8, 0, 0],
                    [0.5, 1.0, 0]], dtype=float)
    rate = collision_rate(pos, 1.0)
    assert rate.shape == (1,)
    assert rate[0] == pytest.approx(2 / 10)
    # Excluding (0,1), listed twice and in both orders: 1 hit / 9 pairs.
    excl = np.array([[1, 0], [0, 1]])
    assert collision_rate(pos, 1.0, exclude=excl)[0] == pytest.approx(1 / 9)


def test_collision_rate_periodic_and_per_frame():
    frame = np.array([[0.2, 1.0, 1.0], [3.9, 1.0, 1.0], [2.0, 3.0, 1.0]])
    traj = np.stack([frame, frame + 10.0])   # a rigid shift: the same distances, rewrapped
    # Open boundaries: 0.2 and 3.9 are 3.7 apart -> no collision.
    np.testing.assert_array_equal(collision_rate(traj, 0.5), [0.0, 0.0])
    # Box 4: minimum image distance 0.3 -> 1 of 3 pairs in every frame.
    np.testing.assert_allclose(collision_rate(traj, 0.5, box=4.0), [1 / 3] * 2)


def test_pairwise_distance_features_invariant():
    pos = np.random.default_rng(10).normal(size=(3, 5, 3))
    rot = Rotation.random(random_state=2).as_matrix()
    feat = pairwise_distance_features(pos)
    assert feat.shape == (3, 10)
    np.testing.assert_allclose(pairwise_distance_features(pos @ rot.T + 1.0),
                               feat, atol=1e-12)
    assert feat[0, 0] == pytest.approx(np.linalg.norm(pos[0, 0] - pos[0, 1]))


def test_fes_gaussian_is_quadratic():
    kT, n = 2.0, 1_000_000
    stds = np.array([3.0, 1.0, 0.3])
    rng = np.random.default_rng(11)
    rot = Rotation.random(random_state=3).as_matrix()
    feats = (rng.normal(size=(n, 3)) * stds) @ rot.T + 4.0
    # 31 bins over +-3.1 sigma: width 0.2 sigma, bin 15 centred at 0,
    # bins 10 and 20 centred at -1 and +1 sigma.
    rng_xy = [[-3.1 * stds[0], 3.1 * stds[0]], [-3.1 * stds[1], 3.1 * stds[1]]]
    res = free_energy_surface(feats, kT=kT, n_bins=31, range=rng_xy)
    F = res["F"]
    assert F.shape == (31, 31) and np.nanmin(F) == 0.0
    assert not np.any(np.isnan(F)) and np.any(np.isinf(F))   # empty -> +inf
    ring = np.array([F[10, 15], F[20, 15], F[15, 10], F[15, 20]])
    # Expected F(1 sigma) - F(0) = kT / 2.  Counts: ~6400 in the centre bin,
    # ~3900 per 1-sigma bin, so std of the mean difference is
    # sqrt(1/6400 + 1/(4*3900)) = 0.016 kT; tolerance 0.06 kT ~ 4 sigma.
    assert (ring.mean() - F[15, 15]) / kT == pytest.approx(0.5, abs=0.06)
    evr = res["explained_variance_ratio"]
    np.testing.assert_allclose(evr, stds[:2] ** 2 / np.sum(stds ** 2),
                               rtol=0.01)   # variance error ~ sqrt(2/n)


def test_fes_reuses_pca_basis():
    rng = np.random.default_rng(12)
    feats = rng.normal(size=(500, 4)) * [2.0, 1.0, 0.5, 0.1]
    first = free_energy_surface(feats, n_bins=10)
    again = free_energy_surface(feats, n_bins=10, pca=first)
    np.testing.assert_array_equal(again["projection"], first["projection"])
    np.testing.assert_array_equal(again["F"], first["F"])
    np.testing.assert_allclose(again["explained_variance_ratio"],
                               first["explained_variance_ratio"])
    # A second trajectory is projected onto the first one's axes.
    other = free_energy_surface(feats[::-1] + 1.0, n_bins=10, pca=first)
    shift = np.ones(feats.shape[1]) @ np.asarray(first["components"]).T     # (1, ..., 1) on them
    np.testing.assert_allclose(other["projection"], np.asarray(first["projection"])[::-1] + shift)


def test_free_energy_difference_is_zero_for_identical_samples():
    x = np.random.default_rng(0).normal(size=5000)
    same = C.free_energy_difference(x, x, kT=0.3)
    assert same["l1"] == 0 and same["max"] == 0
    assert C.free_energy_difference(x, 1.3 * x, kT=0.3)["l1"] > 0.05     # too broad: detected


def test_replica_mean_se_and_molecule_rg2():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, (400, 16))                  # 16 independent replicas
    mean, se = C.replica_mean_se(x)
    assert mean == pytest.approx(x.mean())
    # exact SE 1 / sqrt(6400) = 0.0125; from 16 replicas it scatters by 1 / sqrt(2 x 15) = 18%
    assert abs(se / 0.0125 - 1) < 3 * 0.18
    one_mean, one_se = C.replica_mean_se(x[:, :1])       # one replica: block averaging
    assert one_se == pytest.approx(C.block_standard_error(x[:, 0]))
    pos = rng.normal(size=(5, 7, 3))
    masses = rng.uniform(0.5, 2.0, 7)
    parts = C.molecule_rg2(pos, masses, [0, 3, 7])
    assert np.allclose(parts[1], C.radius_of_gyration_sq(pos[:, 3:], masses[3:]))


def test_block_sem_iid():
    n = 2 ** 17
    x = np.random.default_rng(13).normal(size=n)
    # Selected level has ~2000 blocks: relative std of the SEM estimate
    # 1/sqrt(2*2000) = 1.6 % (1.6 % measured over 40 seeds); 7 % ~ 4 sigma.
    assert block_standard_error(x) == pytest.approx(x.std() / np.sqrt(n),
                                                    rel=0.07)


def test_block_sem_ar1():
    n, phi = 2 ** 17, 0.9
    x = ar1(phi, n, seed=14)
    expected = np.sqrt((1 + phi) / (1 - phi)) / np.sqrt(n)   # unit variance
    # Automatic rule picks B = 512 (256 blocks): relative std
    # 1/sqrt(2*255) = 4.4 % (3.6 % measured); 15 % ~ 4 sigma.
    assert block_standard_error(x) == pytest.approx(expected, rel=0.15)
    # 64 fixed blocks: relative std 1/sqrt(2*63) = 9 %; 30 % ~ 3.3 sigma.
    assert block_standard_error(x, n_blocks=64) == pytest.approx(expected,
                                                                 rel=0.30)


def test_block_sem_warns_when_series_too_short():
    with pytest.warns(RuntimeWarning, match="too short"):
        block_standard_error(ar1(0.999, 64, seed=15))


GOOD_TRAJ = np.random.default_rng(16).uniform(0, 5, size=(10, 4, 3))
NAN_TRAJ = GOOD_TRAJ.copy()
NAN_TRAJ[3, 1, 2] = np.nan
SERIES = np.random.default_rng(17).normal(size=100)


@pytest.mark.parametrize("call, match", [
    (lambda: radius_of_gyration_sq(np.zeros((10, 2)), np.ones(10)),
     r"positions has shape \(10, 2\); expected \[..., n_atoms, 3\]"),
    (lambda: radius_of_gyration_sq(GOOD_TRAJ, [1, 1, 0, 1]), "masses"),
    (lambda: autocorrelation(np.ones(10)), "x is constant"),
    (lambda: autocorrelation([1.0, np.inf, 2.0]), "x contains NaN or inf"),
    (lambda: relaxation_time(SERIES, 0.0), "dt"),
    (lambda: relaxation_time([1.0, 2.0], 0.1), "x"),
    (lambda: mean_squared_displacement(GOOD_TRAJ[0]), "positions"),
    (lambda: mean_squared_displacement(NAN_TRAJ), "positions"),
    (lambda: diffusion_coefficient(GOOD_TRAJ, -1.0), "dt"),
    (lambda: diffusion_coefficient(GOOD_TRAJ, 0.1, fit_start=0.7), "fit_start"),
    (lambda: diffusion_coefficient(GOOD_TRAJ, 0.1, fit_start=0.5, fit_stop=0.6),
     "fit_start/fit_stop"),
    (lambda: radial_distribution(GOOD_TRAJ, 5.0, 2.6, 10), "r_max"),
    (lambda: radial_distribution(GOOD_TRAJ, -5.0, 2.0, 10), "box"),
    (lambda: radial_distribution(GOOD_TRAJ, 5.0, 2.0, 0), "n_bins"),
    (lambda: radial_distribution(NAN_TRAJ, 5.0, 2.0, 10), "positions_a"),
    (lambda: radial_distribution(GOOD_TRAJ, 5.0, 2.0, 10, GOOD_TRAJ[:3]), "positions_b"),
    (lambda: collision_rate(GOOD_TRAJ, 0.0), "threshold"),
    (lambda: collision_rate(GOOD_TRAJ[..., :2], 1.0), "positions"),
    (lambda: collision_rate(GOOD_TRAJ, 1.0, exclude=[[0, 9]]), "exclude"),
    (lambda: collision_rate(GOOD_TRAJ, 1.0, box=0.0), "box"),
    (lambda: free_energy_surface(np.ones((10, 3))), "features"),
    (lambda: free_energy_surface(SERIES), "features"),
    (lambda: free_energy_surface(SERIES.reshape(50, 2), kT=-1), "kT"),
    (lambda: free_energy_surface(SERIES.reshape(50, 2), pca={"mean": np.zeros(3)}), "pca"),
    (lambda: pairwise_distance_features(GOOD_TRAJ[:, :1]), "positions"),
    (lambda: block_standard_error(SERIES, n_blocks=1), "n_blocks"),
    (lambda: block_standard_error(SERIES[:10]), "x"),
])
def test_estimators_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §9 experiments (quick data written by data_gen) --------------------------------------------

def test_experiments_without_data_name_the_command(tmp_path):
    for run, part in ((C.polymer_experiment, "polymers"), (C.electrolyte_experiment, "electrolyte"),
                      (C.interpolation_experiment, "stiff")):
        with pytest.raises(FileNotFoundError, match=f"python data_gen.py --only {part} --out"):
            run(str(tmp_path), quick=True)


def test_bead_species_of_an_electrolyte():
    system, _ = C.electrolyte(4, 12, 24)
    cg = C.cg_system(system, 4.0)
    sp = C.bead_species(cg)
    assert (sp == "cation").sum() == 24 and (sp == "anion").sum() == 24
    assert (sp == "polymer").sum() == cg.n_beads - 48 == 12          # 3 beads per chain
    ions = np.flatnonzero(sp != "polymer")
    assert np.array_equal(system.types[np.argsort(cg.labels)][-48:], np.repeat([2, 3], 24))
    assert np.all(np.bincount(cg.labels)[ions] == 1)


def test_quick_experiment_runs_end_to_end(tmp_path):
    _quick_data(tmp_path, "stiff")
    res = C.interpolation_experiment(str(tmp_path), quick=True, labels=["low", "high"])
    assert set(res["mae"]) == {"low", "high"}
    for label in res["mae"]:
        assert set(res["mae"][label]) == {"bilstm", "unilstm", "hermite", "linear"}
        assert all(np.isfinite(v) for v in res["mae"][label].values())
        fe = res["free_energy"][label]
        assert set(fe["l1"]) == set(fe["max"]) == {"bilstm", "unilstm", "hermite", "linear"}
        assert len(fe["F_true"]) == len(fe["centres"]) == len(fe["F"]["bilstm"])
    assert res["endpoint_error"] <= 1e-5
    assert res["gap"] == 20 and 16 < res["vibration_period_steps"] < 18
    sweep = C.gap_sweep(str(tmp_path), gaps=(5,), quick=True, labels=["mid"])
    assert set(sweep["mae"]["5"]["mid"]) == {"bilstm", "unilstm", "hermite", "linear"}
    C.save_json(tmp_path / "summary.json", {"interpolation": res, "gap_sweep": sweep})


@pytest.mark.parametrize("call, match", [
    (lambda: C.interpolation_experiment(gap=1), "gap"),
    (lambda: C.interpolation_experiment(labels=["warm"]), "labels"),
])
def test_experiments_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- §10 figures, §11 bench and command line: the scripts end to end ----------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`data_gen.py --quick` twice (in-process), then the quick demo on that data (as a script,
    which runs data_gen.py as a script too): the outputs the three tests below check."""
    tmp = tmp_path_factory.mktemp("quick_run")
    data, results = tmp / "data", tmp / "results"
    sys.path.insert(0, HERE)
    import data_gen

    def gen():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            data_gen.main(["--quick", "--out", str(data)])
        return out.getvalue()
    first, again = gen(), gen()
    printed = _run(os.path.join(HERE, "cgmd_ref.py"), "--quick", "--data", str(data), "--out",
                   str(results), cwd=HERE)
    return dict(data=data, results=results, first=first, again=again, printed=printed,
                meta=json.loads((data / "metadata.json").read_text()),
                summary=json.loads((results / "summary.json").read_text()), data_gen=data_gen)


def test_data_gen_quick_is_idempotent(quick_run):
    data, meta, data_gen = quick_run["data"], quick_run["meta"], quick_run["data_gen"]
    names = {"polymer_train", "polymer_test_short", "polymer_test_long", "stiff_low",
             "stiff_mid", "stiff_high", "electrolyte_train_0", "electrolyte_test_1_long"}
    assert names <= set(meta) and meta["size"] == "quick"
    assert "convergence" in meta["polymer_test_long"]
    for name in names:
        traj, _ = C.load_trajectory(data / meta[name]["file"])
        assert np.all(np.isfinite(traj.positions))
    # production starts after the burn-in, not from the built (zig-zag) configuration
    _, test_polymers = data_gen.polymer_sets(data_gen.SIZES["quick"], 0)
    start = np.concatenate([p[1] for p in test_polymers])
    traj, _ = C.load_trajectory(data / "polymer_test_long.npz")
    assert np.abs(traj.positions[0, 0] - start).max() > 0.1
    assert "skipped" not in quick_run["first"]
    assert quick_run["again"].count("skipped") == len(
        [k for k in meta if isinstance(meta[k], dict) and "file" in meta[k]])


def test_demo_closing_table_repeats_the_experiments_numbers(quick_run):
    summary, printed, results = quick_run["summary"], quick_run["printed"], quick_run["results"]
    n_test = quick_run["meta"]["polymer_test_long"]["n_polymers"]
    assert len(summary["md_ground_truth"]["polymer"]) == n_test
    assert "short MD" in printed
    # the closing table repeats the experiments' own numbers, and 'holds' is their target met
    claims = {(c["experiment"], c["figure"]): c for c in summary["claims"]}
    assert len(claims) == len(summary["claims"]) == 11 + 2 * len(C.STIFF_TEMPERATURES)
    cov = claims[("[A] polymers", "one-step 95% interval coverage")]
    assert cov["value"] == summary["polymer"]["calibration"]["coverage_95"]
    assert cov["holds"] == (0.90 <= cov["value"] <= 0.99)
    rank = claims[("[A] electrolyte", "Spearman rank corr. D")]
    assert rank["value"] == summary["electrolyte"]["spearman"]["diffusivity"]
    rg2 = claims[("[A] polymers", "<Rg2> median rel. error")]
    err = summary["polymer"]["rg2_rel_error"]
    assert rg2["value"] == err["learned"] and rg2["baselines"]["short_md"] == err["short_md"]
    assert rg2["target"] == "<= 0.05, < short_md"
    assert claims[("[A] polymers", "Rg2 relaxation time median rel. error")]["target"] == "<= 0.3"
    assert rg2["holds"] == (err["learned"] <= 0.05 and err["learned"] < err["short_md"])
    coll = claims[("[A] electrolyte", "collision rate")]
    c = summary["electrolyte"]["collision_rate"]
    assert coll["value"] == c["learned"] and coll["holds"] == (
        c["learned"] <= 2 * c["ground_truth"] and c["learned"] < c["learned_no_score"])
    mae = summary["interpolation"]["mae"]["low"]
    low = claims[("[B] kT 0.1", "position MAE over the gap")]
    assert low["holds"] == (mae["bilstm"] < min(mae["hermite"], mae["linear"], mae["unilstm"]))
    assert "Summary, seed 0" in printed and summary["run"]["quick"] is True
    # figures: drawn when matplotlib is there, and said so when it is not
    try:
        import matplotlib  # noqa: F401
        pngs = sorted(p.name for p in results.glob("*.png"))
        assert len(pngs) == 8 and "electrolyte_rdf.png" in pngs, pngs
        assert all((results / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    except ImportError:
        assert "matplotlib is not installed" in printed and not list(results.glob("*.png"))


def test_demo_stores_each_paper_a_experiment(quick_run):
    # smoke runs of both [A] experiments, as the demo stored their results
    summary, results = quick_run["summary"], quick_run["results"]
    res = summary["polymer"]
    assert set(res["rg2_rel_error"]) == {"learned", "short_md", "supervised_gnn"}
    assert set(res["relaxation_time_rel_error"]) == {"learned", "short_md"}
    assert res["n_test"] == len(res["per_polymer"]) == 2 and res["speedup"] > 0
    assert res["stability"]["finite"] and (results / "dynamics_gnn.pt").exists()
    assert set(res["spearman"]) == {"rg2", "relaxation_time"}
    assert all(-1 <= v <= 1 for v in res["spearman"].values())
    assert 0 <= res["calibration"]["coverage_95"] <= 1
    assert res["validation"]["n_polymers"] == 1 and res["validation"]["selected_iteration"]
    res = summary["electrolyte"]
    for key in ("diffusivity_log10_mae", "rdf_l1"):
        assert set(res[key]) == {"learned", "learned_no_score", "short_md"}
    assert set(res["collision_rate"]) == {"ground_truth", "learned", "learned_no_score"}
    assert res["n_test"] == len(res["per_system"]) == 2 and res["speedup"] > 0
    assert -1 <= res["spearman"]["diffusivity"] <= 1
    back = C.load_checkpoint(results / "electrolyte_score_gnn.pt",
                             expected_config=C.ScoreConfig(**res["config"]["score"]))
    assert isinstance(back, C.ScoreGNN)


def test_openmm_comparison_simulates_the_same_forces():
    # the benchmark's OpenMM side must be the same physics: forces agree with ours
    pytest.importorskip("openmm")
    chains, x = C.chain_replicas(n_chains=3)
    fluid, y = C.lj_fluid(300, 0.8)
    y = C.simulate(fluid, y, 50, save_every=50, dtype="float64").positions[-1]
    for system, pos in ((chains, x), (fluid, y)):
        context, _ = C.openmm_context(system, pos)
        theirs = context.getState(getForces=True).getForces(asNumpy=True)._value
        ours = C.forces(system, pos).reshape(-1, 3)
        assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max()


def test_bench_quick_prints_throughput():
    printed = _run(os.path.join(HERE, "cgmd_ref.py"), "bench", "--quick", cwd=HERE)
    assert printed.count("atom-steps/s") == 3 and "N=8000 / N=1000" in printed
