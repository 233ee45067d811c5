"""Milliseconds per image of every explainer, next to Captum's and MONAI's own implementation of the same method.

One model (ResNet-18 from MONAI, 1 channel, 3 classes, 224 px, random weights:
time does not depend on the weights), one batch of images explained for each
sample's predicted class, 2 threads. Each implementation gets one warm-up
call on one image, then is timed on the batch: the best of three runs (one
run for methods that take more than 10 s). The ratio is peer / ours:
above 1 means ours is faster. Where both compute the same quantity, the
largest absolute difference of the raw attributions is printed too.

    python benchmarks/baselines_speed.py                 # all methods, 2 images
    python benchmarks/baselines_speed.py --methods occlusion,gradcam --images 4

Budgets (all configurable): occlusion window 32 / stride 16 (169 windows at
224 px), IG 50 steps, Gradient SHAP 20 samples, LIME and KernelSHAP 200
samples on 16 px cells, RISE ``--rise-masks`` (default 1000 rather than the
paper's 4000, to keep the run short; time is linear in the count).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nemt.explainers import get_explainer
from nemt.explainers.attribution import grid_segments
from nemt.models import Classifier, build_model

PEERS = ["occlusion", "gradcam", "gradcam++", "saliency", "ig", "gradshap", "lime", "kernelshap"]
SOLO = ["nemt", "rise", "extremal", "inpainting", "relax"]


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warm, repeats: int = 3, budget_s: float = 10.0, device="cpu"):
    """Best of up to ``repeats`` runs (fewer when one run takes longer than ``budget_s`` in all)."""
    warm()
    synchronize(device)
    best, out, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return out, best


def peers(name, clf, x, t, args):
    """{peer name: callable(x, t) -> raw map comparable with ours (or None)}."""
    from captum import attr as ca
    import monai.visualize as mv
    w, s = args.window, args.stride
    seg = grid_segments(tuple(x.shape[2:]), 16, 1).to(x.device)
    layer = "layer4"

    def captum_gradcam(xx, tt):
        a = ca.LayerGradCam(clf, clf.net.layer4).attribute(xx, target=tt, relu_attributions=True)
        return F.interpolate(a, size=xx.shape[2:], mode="bilinear", align_corners=False)

    def monai_occlusion(xx, tt):  # batch of one only; returns the score under occlusion for every class
        occ = mv.OcclusionSensitivity(clf, mask_size=w, n_batch=args.batch, verbose=False, mode=0.0,
                                      overlap=1 - s / w, activate=False)
        return torch.cat([occ(xx[i:i + 1])[0] for i in range(xx.shape[0])])

    def req(xx):
        return xx.clone().requires_grad_(True)

    table = {
        "occlusion": {"captum": lambda xx, tt: ca.Occlusion(clf).attribute(
            xx, target=tt, sliding_window_shapes=(1, w, w), strides=(1, s, s), baselines=0.0,
            perturbations_per_eval=args.batch)[:, 0], "monai": monai_occlusion},
        "gradcam": {"captum": captum_gradcam,
                    "monai": lambda xx, tt: mv.GradCAM(clf.net, target_layers=layer)(xx, class_idx=None)},
        # MONAI's GradCAMpp multiplies the (B,) score into (B, C, h, w) gradients: it fails for B > 1 (or
        # broadcasts wrongly when w == B), so it gets one image per call
        "gradcam++": {"monai": lambda xx, tt: torch.cat([mv.GradCAMpp(clf.net, target_layers=layer)(
            xx[i:i + 1], class_idx=None) for i in range(xx.shape[0])])},
        "saliency": {"captum": lambda xx, tt: ca.Saliency(clf).attribute(req(xx), target=tt, abs=True)[:, 0]},
        "ig": {"captum": lambda xx, tt: ca.IntegratedGradients(clf).attribute(
            req(xx), target=tt, baselines=0.0, n_steps=50, internal_batch_size=args.batch)[:, 0]},
        "gradshap": {"captum": lambda xx, tt: ca.GradientShap(clf).attribute(
            req(xx), baselines=torch.zeros_like(xx[:1]), n_samples=20, stdevs=0.1, target=tt)[:, 0]},
        "lime": {"captum": lambda xx, tt: ca.Lime(clf).attribute(
            xx, target=tt, feature_mask=seg, baselines=0.0, n_samples=200, perturbations_per_eval=args.batch)[:, 0]},
        "kernelshap": {"captum": lambda xx, tt: ca.KernelShap(clf).attribute(
            xx, target=tt, feature_mask=seg, baselines=0.0, n_samples=200, perturbations_per_eval=args.batch)[:, 0]},
    }
    return table.get(name, {})


def ours(name, clf, args):
    if name == "nemt":  # untrained decoder: its cost does not depend on its weights
        from nemt.explainers import NEMt
        return NEMt(clf, device=args.device).init_module()
    params = {
        "occlusion": {"window": args.window, "stride": args.stride, "batch_size": args.batch},
        "ig": {"batch_size": args.batch}, "lime": {"batch_size": args.batch, "n_samples": 200},
        "kernelshap": {"batch_size": args.batch, "n_samples": 200},
        "rise": {"n_masks": args.rise_masks, "batch_size": args.batch}, "relax": {"n_masks": args.rise_masks,
                                                                                 "batch_size": args.batch},
    }.get(name, {})
    return get_explainer(name, clf, device=args.device, **params)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(PEERS + SOLO))
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="perturbed copies per model call, for all implementations")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--rise-masks", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net = build_model("resnet18", spatial_dims=2, in_channels=1, out_channels=3)
    clf = Classifier.from_module(net, spatial_dims=2, in_channels=1, input_size=(args.size,) * 2,
                                 task="multiclass", label_names=["a", "b", "c"], arch="resnet18").to(args.device).eval()
    x = torch.randn(args.images, 1, args.size, args.size).to(args.device)
    with torch.no_grad():
        t = clf(x).argmax(dim=1)
    where = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    print(f"ResNet-18, 1 x {args.size} px, {args.images} images, {args.threads} threads, batch {args.batch}, "
          f"{args.device} ({where}); torch {torch.__version__}")
    print("| method | ours ms/image | peer | peer ms/image | peer / ours | max abs diff |")
    print("|---|---|---|---|---|---|")
    n = args.images
    ms = {}
    for name in args.methods.split(","):
        try:
            ex = ours(name, clf, args)
        except Exception as e:  # a method not built yet
            print(f"| {name} | not available: {e} | | | | |")
            continue
        raw = getattr(ex, "attribute", None)
        run = (lambda xx, tt: raw(xx, tt)[:, 0]) if raw is not None and name not in ("relax",) else \
            (lambda xx, tt: ex.explain(xx, tt))
        if name == "relax":
            run = lambda xx, tt: ex.explain(xx)  # noqa: E731
        mine, sec = timed(lambda: run(x, t), lambda: run(x[:1], t[:1]), device=args.device)
        ms[name] = 1000 * sec / n
        rows = peers(name, clf, x, t, args)
        if not rows:
            print(f"| {name} | {1000 * sec / n:.0f} | (none in Captum or MONAI) | | | |")
        for peer, fn in rows.items():
            theirs, psec = timed(lambda: fn(x, t), lambda: fn(x[:1], t[:1]), device=args.device)
            diff = ""
            if name != "occlusion" or peer == "captum":
                if name.startswith("gradcam"):  # compare normalised maps: MONAI normalises, Captum does not
                    a = _norm(ex.explain(x, t)[:, 0])
                    b = _norm(theirs.detach().reshape(a.shape))
                    if peer == "monai":  # MONAI's default_normalizer maps max to 0 and min to 1
                        b = 1 - b
                else:
                    a, b = mine.detach().reshape(n, -1), theirs.detach().reshape(n, -1)
                    if name in ("lime", "kernelshap", "gradshap"):
                        a = b = None  # random draws differ between calls: values are compared in the tests
                diff = "" if a is None else f"{float((a.reshape(n, -1) - b.reshape(n, -1)).abs().max()):.1e}"
            print(f"| {name} | {1000 * sec / n:.0f} | {peer} | {1000 * psec / n:.0f} | "
                  f"**{psec / sec:.2f}x** | {diff} |", flush=True)
    if "nemt" in ms:
        print("\nNEMt (one pass, untrained decoder) against each method, ms per image of theirs / of NEMt's:")
        print(", ".join(f"{k} {v / ms['nemt']:.3g}x" for k, v in ms.items() if k != "nemt"))


def _norm(m):
    f = m.reshape(m.shape[0], -1)
    lo, hi = f.min(1, keepdim=True).values, f.max(1, keepdim=True).values
    return ((f - lo) / (hi - lo).clamp_min(1e-12))


if __name__ == "__main__":
    main()
