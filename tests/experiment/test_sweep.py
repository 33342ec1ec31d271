"""Experiment sweep bookkeeping: config validation and scaling, Table 2 aggregation, collapse check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import REPO, seed_of_this_test
from scipy import stats

from skullrec.config import ExperimentConfig, MethodSpec, load_experiment
from skullrec.errors import ConfigError
from skullrec.experiment.report import table2, versus_reference, versus_reference_markdown
from skullrec.experiment.sweep import _pairwise_dsc, run_overrides


def test_paper_config_loads_and_scale_shrinks_epochs_and_checkpoints():
    exp = load_experiment(REPO / "configs" / "paper_skull.yaml", [], None)
    assert [m.name for m in exp.methods] == [
        "baseline", "fam_0.0006", "fam_0.002", "fam_0.02", "fam_0.1", "fam_0.7", "sam", "asam", "lookbehind",
    ]
    assert exp.checkpoint_epochs == [100, 200] and len(exp.seeds) >= 3
    small = load_experiment(REPO / "configs" / "paper_skull.yaml", [], 0.1)
    assert small.epochs == 20 and small.checkpoint_epochs == [10, 20]


def test_experiment_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [{name: a, method: fam, lamda: 0.1}]\n")
    with pytest.raises(ConfigError, match=r"methods\[0\]\.lamda: unknown key"):
        load_experiment(bad, [], None)
    with pytest.raises(ConfigError, match="--scale"):
        load_experiment(REPO / "configs" / "paper_skull.yaml", [], 1.5)
    with pytest.raises(ConfigError, match=r"targets must be .*\['skull', 'lesion'\]"):
        load_experiment(REPO / "configs" / "paper_skull.yaml", ['targets=["skull", "lesion"]'], None)
    with pytest.raises(ConfigError, match="targets must be"):
        load_experiment(REPO / "configs" / "paper_skull.yaml", ["targets=[]"], None)


def test_an_arm_with_fewer_seeds_trains_only_those_in_seed_major_order(tmp_path, monkeypatch):
    """methods[].seeds: a costly arm may train a subset of the seeds; the queue stays seed-major, so the
    arms of seed 0 come first and a sweep stopped early still holds complete seeds of the core comparison."""
    from skullrec.experiment import sweep

    started = []
    monkeypatch.setattr(sweep, "_train_run", lambda cfg, run_dir, device, log: (started.append(run_dir.name), (run_dir, 0, 0.0))[1])
    exp = ExperimentConfig(seeds=[0, 1, 2], methods=[MethodSpec(name="base"), MethodSpec(name="sam", method="sam", seeds=[0, 2]),
                                                      MethodSpec(name="fam", method="fam", lam=1e-4)])
    runs = sweep.train_sweep(exp, tmp_path, "cpu", jobs=1)
    assert started == ["base_seed0", "sam_seed0", "fam_seed0", "base_seed1", "fam_seed1", "base_seed2", "sam_seed2", "fam_seed2"]
    assert sorted(runs) == sorted([("base", 0), ("base", 1), ("base", 2), ("sam", 0), ("sam", 2), ("fam", 0), ("fam", 1), ("fam", 2)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0, 1]\nmethods: [{name: a, seeds: [0, 3]}]\n")
    with pytest.raises(ConfigError, match=r"methods: a: seeds must be a non-empty subset of the experiment's seeds \[0, 1\], got \[0, 3\]"):
        load_experiment(bad, [], None)


def test_run_overrides_build_a_valid_training_config():
    from skullrec.config import load_config

    exp = ExperimentConfig(epochs=7, checkpoint_epochs=[3, 7], max_train_cases=5)
    cfg = load_config(None, run_overrides(exp, MethodSpec(name="fam_x", method="fam", lam=0.02), seed=4))
    assert (cfg.name, cfg.seed, cfg.train.method, cfg.fam.lam) == ("fam_x_seed4", 4, "fam", 0.02)
    assert cfg.train.epochs == 7 and cfg.train.checkpoint_epochs == [3, 7] and cfg.data.max_train_cases == 5


def test_pairwise_dsc_matches_direct_computation():
    rng = np.random.default_rng()
    recon = (rng.random((4, 6, 5, 3)) > 0.5).astype(np.uint8)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = np.mean([2 * (recon[i] & recon[j]).sum() / (recon[i].sum() + recon[j].sum()) for i, j in pairs])
    assert _pairwise_dsc(recon) == pytest.approx(direct, rel=1e-6)
    assert _pairwise_dsc(np.repeat(recon[:1], 3, axis=0)) == pytest.approx(1.0)


def test_table2_mean_and_t_interval_over_seeds():
    rng = np.random.default_rng()
    exp = ExperimentConfig(seeds=[0, 1, 2], checkpoint_epochs=[5], eval_splits=["eval_set1"], methods=[MethodSpec(name="m")])
    rows = []
    for seed in exp.seeds:
        for case in range(4):
            rows.append({"method": "m", "seed": seed, "epoch": 5, "set": "eval_set1", "case": str(case),
                         "dsc": rng.random(), "hd_mm": rng.random() * 10, "hd95_mm": rng.random() * 5,
                         "failed": case == 0 and seed == 1})
    collapse = [{"method": "m", "seed": s, "epoch": 5, "set": "eval_set1", "pairwise_dsc": 0.97} for s in exp.seeds]
    exp.targets = ["skull"]
    (entry,) = table2(rows, collapse, exp)
    per_seed = np.array([np.mean([r["dsc"] for r in rows if r["seed"] == s]) for s in exp.seeds])
    assert entry["dsc"] == pytest.approx(per_seed.mean())
    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / math.sqrt(3)
    assert entry["dsc_ci95"] == pytest.approx(half)
    assert (entry["seeds"], entry["cases"], entry["failed"]) == (3, 4, 1)
    assert entry["collapsed"] is True


def test_versus_reference_pairs_methods_by_seed():
    rng = np.random.default_rng()
    exp = ExperimentConfig(seeds=[0, 1, 2, 3], checkpoint_epochs=[5], eval_splits=["eval_set1"], targets=["implant"],
                           methods=[MethodSpec(name="baseline"), MethodSpec(name="fam", method="fam", lam=0.1)])
    rows = [{"target": "implant", "method": m, "seed": seed, "epoch": 5, "set": "eval_set1", "case": str(case),
             "dsc": rng.random(), "hd_mm": rng.random() * 10, "hd95_mm": rng.random() * 5}
            for m in ("baseline", "fam") for seed in exp.seeds for case in range(3)]
    (entry,) = versus_reference(rows, exp)
    mean = {(m, s): np.mean([r["hd95_mm"] for r in rows if r["method"] == m and r["seed"] == s])
            for m in ("baseline", "fam") for s in exp.seeds}
    d = np.array([mean[("fam", s)] - mean[("baseline", s)] for s in exp.seeds])
    assert (entry["method"], entry["reference"], entry["seeds"]) == ("fam", "baseline", 4)
    assert entry["d_hd95_mm"] == pytest.approx(d.mean())
    assert entry["d_hd95_mm_ci95"] == pytest.approx(stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0)
    # a difference whose interval excludes 0 is starred (a shift of 10 dwarfs the noise of scores in [0, 1])
    shifted = [{**r, "dsc": r["dsc"] + (10.0 if r["method"] == "fam" else 0.0)} for r in rows]
    (moved,) = versus_reference(shifted, exp)
    cell = versus_reference_markdown([moved], exp).splitlines()[-1].split("|")[4].strip()
    assert cell == f"{moved['d_dsc']:+.3f} ± {moved['d_dsc_ci95']:.3f}*" and 9.0 < moved["d_dsc"] < 11.0
    # paired by case: the t-interval over cases of the seed-averaged per-case differences (numpy, by hand)
    per_case = np.array([np.mean([next(r["dsc"] for r in rows if (r["method"], r["seed"], r["case"]) == ("fam", s, c))
                                  - next(r["dsc"] for r in rows if (r["method"], r["seed"], r["case"]) == ("baseline", s, c))
                                  for s in exp.seeds]) for c in ("0", "1", "2")])
    assert entry["cases"] == 3 and entry["d_dsc"] == pytest.approx(per_case.mean())
    assert entry["d_dsc_case_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * per_case.std(ddof=1) / math.sqrt(3))
    # one seed: no seed interval, but the case interval exists
    (one,) = versus_reference([r for r in rows if r["seed"] == 0], ExperimentConfig(**{**exp.__dict__, "seeds": [0]}))
    assert math.isnan(one["d_dsc_ci95"]) and one["d_dsc_case_ci95"] > 0
    with pytest.raises(ConfigError, match="reference: 'sam' is not one of the methods"):
        load_experiment(REPO / "configs" / "demo.yaml", ["reference=sam"], None)


def _shell(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = np.indices((n, n, n), dtype=np.float64)
    c = (n - 1) / 2 + rng.uniform(-1.0, 1.0, 3)
    d = np.sqrt(((g - c[:, None, None, None]) ** 2).sum(0))
    r = n * rng.uniform(0.36, 0.44)
    complete = (d < r) & (d > r - 2.0)
    return complete, complete & (g[2] < c[2] + 0.5 * r)


def test_experiment_end_to_end_is_resumable_and_caches_scores(tmp_path, capsys):
    """A 2-method x 2-seed sweep on 16^3 shells, scored as skulls and as implants: tables, figures,
    collapse rows, implant scores equal to a direct computation; a rerun reuses everything."""
    from skullrec.cli import experiment_command
    from skullrec.data.layout import write_case

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, k in (("train", 4), ("eval_set1", 3), ("eval_set2", 3)):
        for i in range(k):
            write_case(data, split, f"{split}{i}", *_shell(16, rng), np.diag([2.0, 2.0, 3.0, 1.0]))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nbase_config: {REPO / 'configs' / 'baseline.yaml'}\ndata_root: {data}\nseeds: [0, 1]\n"
        "epochs: 2\ncheckpoint_epochs: [1, 2]\n"
        "methods: [{name: base, method: baseline}, {name: fam, method: fam, lam: 0.01}]\nreference: base\n"
        "references: [mean_shape, input]\n"
        'set: ["model.size=16", "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]", "train.val_every=0", '
        '"train.num_threads=1", "train.batch_size=2"]\n'
    )
    out = tmp_path / "results"
    experiment_command(config=cfg, out=out, scale=None, overrides=[], device="cpu", jobs=2)
    first = capsys.readouterr().out
    for name in ("table2.md", "table2.csv", "per_case.csv", "collapse.csv", "vs_reference.md", "vs_reference.csv",
                 "fig1_training_loss.png", "fig2_boxplots.png"):
        assert (out / name).stat().st_size > 0, name
    import csv

    per_case = list(csv.DictReader((out / "per_case.csv").open()))
    # targets x (methods x seeds + references x 1) x checkpoints x sets x cases
    assert len(per_case) == 2 * (2 * 2 + 2) * 2 * 2 * 3
    assert {r["method"] for r in per_case} == {"base", "fam", "ref:mean_shape", "ref:input"}
    assert {r["target"] for r in per_case} == {"skull", "implant"}
    table = list(csv.DictReader((out / "table2.csv").open()))
    assert len(table) == 2 * 4 * 2 * 2 and all(0.0 <= float(r["dsc"]) <= 1.0 for r in table)
    assert "| base | eval_set1 | 1 |" in first and "target implant" in first and "| ref:mean_shape | eval_set1 | 1 |" in first
    # the mean shape is one mask for every input: the collapse check flags it; DSC - mean shape is 0 on its own row
    ms = [r for r in table if r["method"] == "ref:mean_shape"]
    assert len(ms) == 2 * 2 * 2 and all(r["collapsed"] == "true" and float(r["dsc_minus_mean_shape"]) == 0.0 for r in ms)
    # the implant rows are what predict writes: reconstruction AND NOT defective, 26-connected islands
    # below 100 mm^3 removed (voxels are 2 x 2 x 3 = 12 mm^3 here), recomputed here with scipy
    import torch
    from scipy import ndimage

    from skullrec.data.layout import load_split
    from skullrec.nets.checkpoint import load_checkpoint

    split = load_split(data, "eval_set2")
    model, _, _ = load_checkpoint(out / "runs" / "fam_seed1" / "ckpt_epoch002.safetensors", device=torch.device("cpu"))
    with torch.no_grad():
        out_ = model.eval()(torch.as_tensor(split.defective, dtype=torch.float32)[:, None])
        recon = ((out_[:, 1] > out_[:, 0]) if out_.shape[1] == 2 else (out_[:, 0] > 0)).numpy()  # bone channel wins
    for i, cid in enumerate(split.ids):
        raw = recon[i] & (split.defective[i] == 0)
        labels, n = ndimage.label(raw, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())
        pred = raw & np.isin(labels, [k for k in range(1, n + 1) if sizes[k] * 12.0 >= 100.0])
        truth = (split.complete[i] == 1) & (split.defective[i] == 0)
        assert truth.any()
        (row,) = [r for r in per_case if (r["target"], r["method"], r["seed"], r["epoch"], r["set"], r["case"])
                  == ("implant", "fam", "1", "2", "eval_set2", cid)]
        assert float(row["dsc"]) == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()), abs=1e-6)
    # a second run reuses the finished runs and the cached scores and prints the same table
    cached = sorted(p.name for p in (out / "eval").iterdir())
    assert len(cached) == 2 * 2 * 2 * 2
    experiment_command(config=cfg, out=out, scale=None, overrides=[], device="cpu", jobs=1)
    second = capsys.readouterr()
    assert "(reused)" in second.err
    assert second.out.split("training")[0] == first.split("training")[0]


def test_reference_predictors_against_a_direct_numpy_computation(tmp_path):
    """ref:mean_shape / input / nearest scored by the experiment == DSC of the same predictions computed here."""
    from skullrec.data.layout import load_split, write_case
    from skullrec.experiment.references import mean_shape
    from skullrec.experiment.sweep import ExperimentConfig, evaluate_references

    rng = np.random.default_rng(seed_of_this_test())
    data = tmp_path / "data"
    for split, k in (("train", 5), ("eval_set1", 3)):
        for i in range(k):
            write_case(data, split, f"{split}{i}", *_shell(16, rng), np.diag([2.0, 2.0, 3.0, 1.0]))
    exp = ExperimentConfig(data_root=str(data), eval_splits=["eval_set1"], checkpoint_epochs=[7], targets=["skull"],
                           references=["mean_shape", "input", "nearest"])
    rows, collapse = evaluate_references(exp)
    train, ev = load_split(data, "train"), load_split(data, "eval_set1")
    tc = train.complete.astype(bool)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    # mean shape: brute force over every threshold between the k/N levels, on training skulls only
    m = tc.mean(0)
    best = max(((np.mean([dice(m > t, c) for c in tc]), t) for t in (np.arange(5) + 0.5) / 5))[1]
    mask, thr = mean_shape(train.complete)
    assert thr == pytest.approx(best) and np.array_equal(mask.astype(bool), m > best)
    for i, cid in enumerate(ev.ids):
        d, truth = ev.defective[i].astype(bool), ev.complete[i].astype(bool)
        near = int(np.argmax([dice(d, td.astype(bool)) for td in train.defective]))
        expected = {"ref:mean_shape": dice(m > best, truth), "ref:input": dice(d, truth), "ref:nearest": dice(tc[near], truth)}
        for method, value in expected.items():
            (row,) = [r for r in rows if r["method"] == method and r["case"] == cid]
            assert row["dsc"] == pytest.approx(value, abs=1e-6) and row["epoch"] == 7 and row["seed"] == 0
    pw = {c["method"]: c["pairwise_dsc"] for c in collapse}
    assert pw["ref:mean_shape"] == pytest.approx(1.0)


def test_experiment_jobs_mode_batched_trains_seed_variants_together(tmp_path):
    """jobs_mode batched: the baseline seeds train together in-process; FAM still by subprocesses; both are tabulated."""
    from skullrec.data.layout import write_case
    from skullrec.experiment.sweep import run_experiment
    from skullrec.training.run_dir import read_metrics, run_finished

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, k in (("train", 4), ("eval_set1", 2), ("eval_set2", 2)):
        for i in range(k):
            write_case(data, split, f"{split}{i}", *_shell(16, rng), np.diag([2.0, 2.0, 3.0, 1.0]))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nbase_config: {REPO / 'configs' / 'baseline.yaml'}\ndata_root: {data}\nseeds: [0, 1]\n"
        "epochs: 2\ncheckpoint_epochs: [2]\njobs_mode: batched\n"
        "methods: [{name: base, method: baseline}, {name: fam, method: fam, lam: 0.01}]\nreference: base\n"
        'set: ["model.size=16", "model.channels=[8, 16, 8]", "model.strides=[2, 2, 2]", "train.val_every=0", '
        '"train.num_threads=1", "train.batch_size=2"]\n'
    )
    out = tmp_path / "results"
    messages: list[str] = []
    run_experiment(cfg, out=out, device="cpu", done=messages.append)
    for seed in (0, 1):
        base = read_metrics(out / "runs" / f"base_seed{seed}" / "metrics.jsonl")
        fam = read_metrics(out / "runs" / f"fam_seed{seed}" / "metrics.jsonl")
        assert [r.get("batched_runs") for r in base] == [2, 2] and all("batched_runs" not in r for r in fam)
        assert [r.get("batched_forward") for r in base] == ["loop", "loop"]  # "auto" on a CPU
        assert run_finished(out / "runs" / f"base_seed{seed}")
    assert sum("2 runs batched" in m for m in messages) == 2
    assert (out / "table2.csv").stat().st_size > 0
    with pytest.raises(Exception, match="jobs_mode"):
        run_experiment(cfg, out=tmp_path / "bad", device="cpu", overrides=["jobs_mode=threads"])
    with pytest.raises(Exception, match="batched_forward"):
        run_experiment(cfg, out=tmp_path / "bad2", device="cpu", overrides=["batched_forward=grouped"])
