"""Students of extremal perturbation and RISE on BUSI (128 px): teacher cost, student fidelity, break-even.

Two steps, so that the heavy part can run on a GPU machine that cannot read the data folder:

    # 1. here: BUSI's 128 px images (8-bit, as the model sees them before normalisation), masks, labels, split
    python benchmarks/students_busi.py pack --model runs/busi-r18 --data ../shared/data/busi --out .carry/busi128
    # 2. anywhere (e.g. --device cuda): teachers on the training split, students (3 seeds), fidelity on test
    python benchmarks/students_busi.py run --pack .carry/busi128 --out runs/students --device cuda

The pack holds the model folder's card, weights and split, so step 2 needs nothing else. Teachers: extremal
perturbation (300 steps) and RISE (4000 masks), and the noisy ones (30 steps; 200 masks). Each student: NEMt's
decoder, 10 epochs, BCE on the teacher's maps; seeds 0, 1, 2 share the teacher's maps (teacher_seed 0).
Prints one table: relevance mass and pointing game of teacher and student on the test split, Pearson
correlation of the maps, ms per image of both, the teacher's minutes on the training split, break-even images.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TEACHERS = {  # name: (method, parameters)
    "extremal": ("extremal", {}),
    "rise": ("rise", {"n_masks": 4000}),
    "extremal-30": ("extremal", {"steps": 30}),
    "rise-200": ("rise", {"n_masks": 200}),
}
SPLITS = {"train": 0, "val": 1, "test": 2}


def pack(args) -> None:
    from nemt.data.manifest import open_dataset
    from nemt.data.dataset import ImageDataset
    from nemt.models import load_model
    from nemt.models.training import load_splits

    clf = load_model(args.model)
    manifest = open_dataset(args.data, task=clf.task, labels=list(clf.label_names))
    splits = load_splits(args.model, manifest)
    out = Path(args.out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "model.safetensors", "splits.csv"):
        shutil.copy2(Path(args.model) / name, out / "model" / name)
    units, masks, ys, split, index = [], [], [], [], []
    for name, code in SPLITS.items():
        ds = ImageDataset(manifest, clf.preprocessing, splits[name])
        for i in range(len(ds)):
            x, gt, _ = ds.unit_item(i)
            units.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
            masks.append(gt.to(torch.uint8))
            ys.append(int(manifest.samples[ds.indices[i]].y))
            split.append(code)
            index.append(int(ds.indices[i]))
    import numpy as np
    gt = torch.stack(masks)
    bits = torch.from_numpy(np.packbits(gt.numpy().astype(bool).reshape(-1)))  # 1 bit a pixel: the pack stays small
    save_file({"unit": torch.stack(units), "gt_bits": bits, "gt_shape": torch.tensor(gt.shape), "y": torch.tensor(ys),
               "split": torch.tensor(split), "index": torch.tensor(index)}, str(out / "busi128.safetensors"))
    print(f"packed {len(ys)} images into {out}")


def run(args) -> None:
    from nemt.bench.fidelity import fidelity_report
    from nemt.bench.runner import BenchmarkData, Item
    from nemt.explainers import NEMt
    from nemt.models import load_model
    from nemt.params import parse_value

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    pk = Path(args.pack)
    clf = load_model(pk / "model", device=args.device)
    t = load_file(str(pk / "busi128.safetensors"))
    import numpy as np
    shape = tuple(int(v) for v in t["gt_shape"])
    t["gt"] = torch.from_numpy(np.unpackbits(t["gt_bits"].numpy())[:int(np.prod(shape))].reshape(shape).copy())
    x = clf.preprocessing.normalise(t["unit"].float() / 255)
    y, split = t["y"], t["split"]

    def part(code, limit=None):
        idx = (split == code).nonzero().flatten()[:limit]
        return x[idx], y[idx], t["gt"][idx].bool(), idx

    xtr, ytr, _, _ = part(0, args.limit)
    names = list(clf.label_names)

    def bench_of(code, tag):
        xs, ys, gs, ids = part(code, args.limit)
        items = [Item(k, k, f"{tag}-{int(ids[k])}", int(ys[k]), names[int(ys[k])], bool(gs[k].any()))
                 for k in range(len(ys))]
        return BenchmarkData(xs.to(dev), (t["unit"][ids].float() / 255), gs.to(dev), items, names,
                             fingerprint=f"busi128-{tag}-{len(items)}"), xs, ys

    val_bench, xva, yva = bench_of(1, "val")
    test_bench, _, _ = bench_of(2, "test")
    train = torch.utils.data.TensorDataset(xtr, ytr)
    val = [(xva[i:i + 32], yva[i:i + 32]) for i in range(0, len(yva), 32)]
    out = Path(args.out)
    rows = []

    def student(tname, method, params, seed, loss, epochs, bench, split):
        folder = out / f"{tname}-{loss}{epochs}-s{seed}"
        cache = out / f"{tname}-teacher"  # the teacher's maps, shared by the seeds and variants
        if not (folder / "teacher").exists() and cache.exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "teacher").symlink_to(cache.resolve(), target_is_directory=True)
        t0 = time.perf_counter()
        st = NEMt(clf, objective="teacher", teacher=method, teacher_params=params, epochs=epochs, seed=seed,
                  device=args.device, teacher_batch=args.teacher_batch, teacher_loss=loss)
        st.fit(train, val_data=val, out_dir=folder, progress=False, log=print, guard=False)
        if not cache.exists():
            (folder / "teacher").rename(cache)
            (folder / "teacher").symlink_to(cache.resolve(), target_is_directory=True)
        fit_s = time.perf_counter() - t0
        rep = fidelity_report(st, bench, out / f"{tname}-{loss}{epochs}-{split}-s{seed}",
                              batch_size=args.teacher_batch, progress=False, log=print,
                              cache_dir=out / f"{tname}-teacher-{split}")
        rep.update({"student_seed": seed, "fit_seconds_total": fit_s, "teacher_name": tname, "split": split,
                    "loss": loss, "epochs": epochs, "folder": folder.name})
        print(json.dumps({k: rep[k] for k in ("teacher_name", "split", "loss", "epochs", "student_seed", "pearson",
                                               "student", "teacher_maps", "teacher_seconds_on_training_split",
                                               "break_even_images")}), flush=True)
        return rep

    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    chosen = {}
    for tname in args.teachers.split(","):
        method, params = TEACHERS[tname]
        params = {**params, **{k.split(".", 1)[1].split("=")[0]: parse_value(k.split("=", 1)[1])
                               for k in args.teacher_param if k.split(".", 1)[0] == method}}
        loss, epochs = variants[0]
        if len(variants) > 1:  # chosen on the validation split (seed 0); the test split only reports
            scored = []
            for v_loss, v_epochs in variants:
                rep = student(tname, method, params, 0, v_loss, v_epochs, val_bench, "val")
                score = (rep["student"]["relevance_mass"]["mean"] + rep["student"]["pointing_game"]["mean"]) / 2
                scored.append((score, v_loss, v_epochs))
                rows.append(rep)
            _, loss, epochs = max(scored)
            chosen[tname] = {"loss": loss, "epochs": epochs, "val": scored}
            print(f"{tname}: chosen on validation: {loss}, {epochs} epochs ({scored})", flush=True)
        seeds = [0] if "-" in tname else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            rows.append(student(tname, method, params, seed, loss, epochs, test_bench, "test"))
            for where in [out] + ([Path(args.artifacts)] if args.artifacts else []):
                where.mkdir(parents=True, exist_ok=True)
                (where / "students.json").write_text(json.dumps({"chosen": chosen, "rows": rows}, indent=1))
                (where / "students.md").write_text(table([r for r in rows if r["split"] == "test"]) + "\n")
    rows_test = [r for r in rows if r["split"] == "test"]
    print(table(rows_test))
    if args.artifacts:  # the students of --tar-teachers, to check on other machines
        import tarfile
        with tarfile.open(Path(args.artifacts) / "students.tar.gz", "w:gz") as tar:
            for r in rows_test:
                if r["teacher_name"] in args.tar_teachers.split(","):
                    for f in ("explainer.json", "explainer.safetensors", "collapse.json"):
                        p = out / r["folder"] / f
                        if p.is_file():
                            tar.add(p, arcname=f"{r['folder']}/{f}")


MAP_CANDIDATES = [("sigmoid", None), ("areas", [0.01]), ("areas", [0.025]), ("areas", [0.05]), ("areas", [0.1]),
                  ("areas", [0.01, 0.05])]


def evaluate(args) -> None:
    """Students brought back from `run` on this machine's exact inputs: the student's map chosen on the
    validation split (seed 0), then relevance mass and pointing game of every seed on the test split."""
    from nemt.bench.runner import load_benchmark_data
    from nemt.data.manifest import open_dataset
    from nemt.explainers import get_explainer
    from nemt.metrics import pointing_game, relevance_mass
    from nemt.models import load_model
    from nemt.models.training import load_splits

    torch.set_num_threads(args.threads)
    clf = load_model(args.model)
    man = open_dataset(args.data, task=clf.task, labels=list(clf.label_names))
    splits = load_splits(args.model, man)
    data = {s: load_benchmark_data(clf, man, splits[s]) for s in ("val", "test")}

    def score(st, split):
        bd = data[split]
        idx = torch.tensor([it.sample for it in bd.items])
        t = torch.tensor([it.target for it in bd.items])
        maps = torch.cat([st.explain(bd.x[idx[i:i + 16]], target=t[i:i + 16]) for i in range(0, len(idx), 16)])
        gt = bd.gt[idx]
        return (float(relevance_mass(maps, gt)[:, 0].nanmean()), float(pointing_game(maps, gt)[:, 0].nanmean()))

    root = Path(args.students)
    lines = ["| teacher | student map (chosen on val) | val rm / pg (seed 0) | test rm | test pg | seeds |",
             "|---|---|---|---|---|---|"]
    for teacher in args.teachers.split(","):
        folders = sorted(root.glob(f"{teacher}-*-s*"))
        s0 = get_explainer("nemt", clf, path=folders[0])
        val = []
        for kind, areas in MAP_CANDIDATES:
            s0.set_student_map(kind, areas)
            rm, pg = score(s0, "val")
            val.append(((rm + pg) / 2, kind, areas, rm, pg))
            print(teacher, "val", kind, areas, f"rm {rm:.3f} pg {pg:.3f}", flush=True)
        best = max(val, key=lambda v: v[0])
        tests = []
        for f in folders:
            st = get_explainer("nemt", clf, path=f).set_student_map(best[1], best[2])
            tests.append(score(st, "test"))
            print(teacher, f.name, "test", tests[-1], flush=True)
        rms, pgs = [a for a, _ in tests], [b for _, b in tests]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| {teacher} | {best[1]} {best[2] or ''} | {best[3]:.3f} / {best[4]:.3f} | "
                     f"{statistics.fmean(rms):.3f} ± {sd(rms):.3f} | {statistics.fmean(pgs):.3f} ± {sd(pgs):.3f} | "
                     f"{len(tests)} |")
    print("\n".join(lines))


def table(rows) -> str:
    def ms(vals):
        return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
    lines = ["| teacher | student seeds | rm teacher | rm student | pg teacher | pg student | Pearson | "
             "ms/img teacher | ms/img student | teacher on train (min) | break-even (images) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["teacher_name"], []).append(r)
    for name, rs in by.items():
        g = lambda k, s: [r[k][s]["mean"] for r in rs]  # noqa: E731
        be = [r["break_even_images"] for r in rs if r["break_even_images"]]
        lines.append(f"| {name} ({rs[0]['loss']}, {rs[0]['epochs']} ep.) | {len(rs)} | {ms(g('teacher_maps', 'relevance_mass'))} | "
                     f"{ms(g('student', 'relevance_mass'))} | {ms(g('teacher_maps', 'pointing_game'))} | "
                     f"{ms(g('student', 'pointing_game'))} | {ms([r['pearson']['mean'] for r in rs])} | "
                     f"{statistics.fmean(r['teacher_maps']['ms_per_image'] for r in rs):.1f} | "
                     f"{statistics.fmean(r['student']['ms_per_image'] for r in rs):.2f} | "
                     f"{rs[0]['teacher_seconds_on_training_split'] / 60:.2f} | "
                     f"{statistics.fmean(be):.0f} |" if be else "| - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pack", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--teachers", default="extremal,rise,extremal-30,rise-200")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--variants", default="bce:10", help="student loss:epochs to compare on the validation split "
                   "(seed 0), e.g. bce:10,kl:10,bce:30; the best (mean of relevance mass and pointing game) goes on")
    r.add_argument("--teacher-batch", type=int, default=16)
    r.add_argument("--limit", type=int, default=None, help="at most this many images per split (a quick check)")
    r.add_argument("--artifacts", default=None, help="also write the table and the students of --tar-teachers here")
    r.add_argument("--tar-teachers", default="extremal", help="whose students go into ARTIFACTS/students.tar.gz")
    r.add_argument("--teacher-param", action="append", default=[], help="TEACHER.KEY=VALUE, e.g. rise.batch_size=500")
    e = sub.add_parser("evaluate")
    e.add_argument("--students", required=True, help="folder with TEACHER-...-sN student folders (from run)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--teachers", default="extremal,rise")
    e.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"pack": pack, "run": run, "evaluate": evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
