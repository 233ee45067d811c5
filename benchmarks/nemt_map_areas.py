"""Label-free choice of NEMt's map areas on the validation split (docs/known-gaps.md: 3D): deletion/insertion AUC
next to relevance mass / pointing game (which need masks). Cases: BUSI seed 0, demo seed 0, 3D phantoms."""
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from nemt.models import load_model
from nemt.explainers import get_explainer
from nemt.data.dataset import ImageDataset
from nemt.models.training import load_splits
from nemt.metrics import get_metric
import nemt.cli as cli
# run: python benchmarks/nemt_map_areas.py ph3d,demo,busi 60  (needs the runs named below: docs/results.md, "Do NEMt's defaults carry?")
CASES = {"busi": ("runs/busi-r18", "../shared/data/busi", "runs/busi3-nemt-s0"),
         "demo": ("runs/demo3-0/model", "runs/demo3-0/data", "runs/demo3-0/explainer"),
         "ph3d": ("runs/defaults3/ph3d-model", "runs/defaults3/ph3d/manifest.csv", "runs/defaults3/ph3d-nemt")}
CANDS = [[0.01], [0.025], [0.05], [0.1], [0.01, 0.025, 0.05, 0.1, 0.2]]
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 60
for case in sys.argv[1].split(","):
    mdir, data, edir = CASES[case]
    clf = load_model(mdir)
    ex = get_explainer("nemt", clf, path=edir)
    man = cli._open(Path(data), clf.task, ",".join(clf.label_names))
    ds = ImageDataset(man, clf.preprocessing, load_splits(mdir, man)["val"][:limit])
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items]); gt = torch.stack([it["gt"] for it in items])
    t = torch.tensor([int(it["y"]) for it in items])[:, None]
    has = torch.tensor([bool(it["has_gt"]) and it["gt"].any().item() for it in items])
    for areas in CANDS:
        t0 = time.time()
        ex.set_map_areas(areas)
        maps = torch.cat([ex.explain(x[i:i+16], target=t[i:i+16]) for i in range(0, len(x), 16)])
        d = get_metric("deletion_auc").call({"model": clf, "x": x, "maps": maps, "target": t}, steps=20, baseline="blur").nanmean().item()
        ins = get_metric("insertion_auc").call({"model": clf, "x": x, "maps": maps, "target": t}, steps=20).nanmean().item()
        rm = get_metric("relevance_mass").call({"maps": maps[has], "gt": gt[has]}).nanmean().item()
        pg = get_metric("pointing_game").call({"maps": maps[has], "gt": gt[has]}).nanmean().item()
        print(f"{case} val n={len(x)} areas={areas} del {d:.3f} ins {ins:.3f} ins-del {ins-d:.3f} | rm {rm:.3f} pg {pg:.3f} ({time.time()-t0:.0f}s)", flush=True)
