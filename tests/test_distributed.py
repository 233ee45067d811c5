"""torchrun for training and fitting: 2 gloo processes on CPU give the 1-process result (issue 18).

What makes it possible (``nemt.distributed``): every rank walks the same seeded order of micro-batches and takes
its share of each optimiser step, and each micro-batch's random draws come from a generator keyed by (seed,
epoch, micro-batch), so N processes with ``--accumulate A`` see exactly the micro-batches (and batch-norm
groups) that 1 process with ``--accumulate N*A`` sees. The one difference is the order of a sum: DDP averages
the ranks' gradients (g0 + g1) / 2 where one process accumulates g0 / 2 + g1 / 2. The tolerance below (1e-5 on
weights after a few Adam steps of learning rate <= 3e-3) bounds what that rounding can do; in practice the two
agree to the last bit or within 1e-7. Batch-norm running statistics are not compared: as with any
DistributedDataParallel run without SyncBatchNorm, they are rank 0's, estimated on its half of the batches.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemt.distributed import Context, StepBatches, batch_generator, epoch_order

WEIGHT_ATOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i)


@pytest.mark.parametrize("n,batch,acc", [(50, 4, 1), (50, 4, 2), (37, 3, 3), (8, 4, 1)])
def test_ranks_share_the_one_process_micro_batches(n, batch, acc):
    """2 ranks with accumulate A cover exactly the micro-batches of 1 process with 2A, under the same indices."""
    ds = _Range(n)
    one = {i: b.tolist() for i, b in StepBatches(ds, batch, seed=3, accumulate=2 * acc)}
    ranks = [dict((i, b.tolist()) for i, b in StepBatches(ds, batch, seed=3, accumulate=acc, ctx=Context(r, 2)))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # every rank steps the same number of times
    assert not set(ranks[0]) & set(ranks[1])
    assert {**ranks[0], **ranks[1]} == one
    if n >= batch:
        assert sum(map(len, one.values())) == (n // batch) // (2 * acc) * (2 * acc) * batch


def test_order_and_draws_depend_on_seed_epoch_and_index_only():
    ds = _Range(20)
    sb = StepBatches(ds, 5, seed=1)
    sb.set_epoch(2)
    first = [b.tolist() for _, b in sb]
    sb.set_epoch(0)
    sb.set_epoch(2)
    assert [b.tolist() for _, b in sb] == first  # a resumed epoch sees the same order
    assert epoch_order(20, 1, 2) != epoch_order(20, 1, 3)
    a = torch.rand(4, generator=batch_generator(0, 1, 7))
    assert torch.equal(a, torch.rand(4, generator=batch_generator(0, 1, 7)))
    assert not torch.equal(a, torch.rand(4, generator=batch_generator(0, 1, 8)))


# --- 2 processes through torchrun ------------------------------------------------------------------------------

def _nemt(args, cwd, procs=1, **kw):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone"] \
        if procs > 1 else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "nemt", *args], cwd=cwd, env={**ENV, **kw.pop("env", {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args, cwd, procs=1):
    p = _nemt(args, cwd, procs)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    return out


def _weights(folder: Path, key: str) -> dict[str, torch.Tensor]:
    from nemt.checkpoint import load_state
    st = load_state(folder / "state" / "last")
    return {k: v for k, v in st[key].items() if not any(s in k for s in ("running_", "num_batches"))}, st


def _assert_same_weights(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=WEIGHT_ATOL, msg=k)


TRAIN = ["train", "--data", "data/manifest.csv", "--arch", "smallcnn", "--size", "32", "--epochs", "4",
         "--batch-size", "4", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One phantom data set; the classifier trained by 1 process (accumulate 2) and by 2 (accumulate 1)."""
    from nemt.data import write_phantom_dataset
    root = tmp_path_factory.mktemp("dist")
    write_phantom_dataset(root / "data", 48, 32, seed=0)
    _run(TRAIN + ["--out", "one", "--accumulate", "2"], root)
    _run(TRAIN + ["--out", "two", "--accumulate", "1"], root, procs=2)
    return root


def test_two_process_training_equals_one_process(runs):
    (a, sa), (b, sb) = _weights(runs / "one", "model"), _weights(runs / "two", "model")
    _assert_same_weights(a, b)
    assert [h["train_loss"] for h in sa["history"]] == pytest.approx([h["train_loss"] for h in sb["history"]],
                                                                      rel=1e-6)
    assert (runs / "two" / "model.safetensors").is_file() and (runs / "two" / "splits.csv").is_file()


def test_two_process_pantypes_training_equals_one_process(runs):
    """Pantypes samples z = mu + sigma * eps in training: its noise is keyed by the micro-batch (as the
    augmentation is), so 2 ranks draw what 1 process draws for the same micro-batches (before, each rank's
    own step counter gave rank 1 the noise of rank 0's batch)."""
    args = ["train", "--data", "data/manifest.csv", "--arch", "pantypes", "--arch-param", "latent_dim=16",
            "--arch-param", "width=4", "--size", "32", "--epochs", "2", "--batch-size", "4", "--seed", "0",
            "--no-progress", "--no-augment"]
    _run(args + ["--out", "p1", "--accumulate", "2"], runs)
    _run(args + ["--out", "p2", "--accumulate", "1"], runs, procs=2)
    (a, sa), (b, sb) = _weights(runs / "p1", "model"), _weights(runs / "p2", "model")
    _assert_same_weights({k: v for k, v in a.items() if k != "noise_step"},
                         {k: v for k, v in b.items() if k != "noise_step"})
    assert [h["train_loss"] for h in sa["history"]] == pytest.approx([h["train_loss"] for h in sb["history"]],
                                                                      rel=1e-5)


@pytest.mark.parametrize("guide", [["--guide", "mimic", "--copies", "2"], ["--guide", "mask"]], ids=["mimic", "mask"])
def test_two_process_guided_training_equals_one_process(runs, guide):
    """Guided training under torchrun. MIMIC's adversarial term back-propagates twice, which DDP does not
    take, so the loop averages the ranks' gradients itself (``average_gradients``), the copies' and, in its
    epochs, the discriminator's (which steps once per optimiser step). 2 epochs: MIMIC's first is the copies'
    adversarial epoch, its second the discriminator's; the discriminator's weights are compared too."""
    name = guide[1]
    args = TRAIN[:TRAIN.index("--epochs")] + ["--epochs", "2"] + TRAIN[TRAIN.index("--epochs") + 2:] + guide
    _run(args + ["--out", f"{name}1", "--accumulate", "2"], runs)
    out = _run(args + ["--out", f"{name}2", "--accumulate", "1"], runs, procs=2)
    (a, sa), (b, sb) = _weights(runs / f"{name}1", "model"), _weights(runs / f"{name}2", "model")
    _assert_same_weights(a, b)
    if name == "mimic":
        _assert_same_weights(_weights(runs / f"{name}1", "discriminator")[0],
                             _weights(runs / f"{name}2", "discriminator")[0])
        assert [h["discriminator_accuracy"] for h in sa["history"]] == \
            pytest.approx([h["discriminator_accuracy"] for h in sb["history"]], abs=1e-9)
    assert [h["train_loss"] for h in sa["history"]] == pytest.approx([h["train_loss"] for h in sb["history"]],
                                                                      rel=1e-6)
    assert out.count('"metrics"') == 1  # rank 0 alone reports
    assert load_model_card(runs / f"{name}2")["training"]["guide"]["kind"] == name


def load_model_card(folder: Path) -> dict:
    import json
    return json.loads((folder / "model.json").read_text())


def test_two_process_fit_equals_one_process(runs):
    fit = ["fit", "--model", "one", "--data", "data/manifest.csv", "--epochs", "2", "--batch-size", "4",
           "--seed", "0", "--no-progress", "--allow-collapse"]
    _run(fit + ["--out", "e1", "--accumulate", "2"], runs)
    out = _run(fit + ["--out", "e2", "--accumulate", "1"], runs, procs=2)
    (a, sa), (b, sb) = _weights(runs / "e1", "module"), _weights(runs / "e2", "module")
    _assert_same_weights(a, b)
    assert [h["loss"] for h in sa["history"]] == pytest.approx([h["loss"] for h in sb["history"]], rel=1e-6)
    assert (runs / "e2" / "explainer.safetensors").is_file()
    assert out.count('"explainer"') == 1  # rank 0 alone reports


def _rank_pid(mark: str, rank: int) -> int | None:
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            items = env.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NEMT_TEST_MARK={mark}".encode() in items and f"RANK={rank}".encode() in items \
                and b"LOCAL_RANK=" + str(rank).encode() in items:
            return int(env.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_killed_rank_resumes_to_the_same_result(runs):
    """SIGKILL rank 1 once epoch 1's resume point exists; the re-run resumes and ends where the unbroken run did."""
    mark = f"{os.getpid()}-{time.time()}"
    p = _nemt(TRAIN + ["--out", "killed"], runs, procs=2, env={"NEMT_TEST_MARK": mark})
    state = runs / "killed" / "state" / "last.json"
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and p.poll() is None:
        if state.is_file():
            pid = _rank_pid(mark, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    out, _ = p.communicate(timeout=300)
    assert killed and p.returncode != 0, out[-3000:]
    from nemt.checkpoint import load_state
    done = load_state(runs / "killed" / "state" / "last")["epoch"]
    assert 1 <= done < 4  # killed mid-run
    again = _run(TRAIN + ["--out", "killed"], runs, procs=2)
    assert f"resuming {Path('killed')}" in again or "resuming" in again
    _assert_same_weights(_weights(runs / "killed", "model")[0], _weights(runs / "two", "model")[0])


def test_explain_a_data_set_over_two_ranks_and_resume(runs):
    """`nemt explain --data`: 2 ranks write the maps and index 1 process writes; a re-run redoes only what is missing."""
    import json
    args = ["explain", "--model", "one", "--data", "data/manifest.csv", "--split", "test", "--method", "gradcam",
            "--target", "predicted", "--no-progress"]
    _run(args + ["--out", "x1"], runs)
    _run(args + ["--out", "x2"], runs, procs=2)
    index = json.loads((runs / "x1" / "explanations.json").read_text())
    assert json.loads((runs / "x2" / "explanations.json").read_text()) == index and len(index) >= 5
    assert sorted(p.name for p in (runs / "x2" / "log").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    for rec in index:
        for name in rec["targets"]:
            f = f"{rec['outputs']}__{name}.npy"
            assert (runs / "x1" / f).read_bytes() == (runs / "x2" / f).read_bytes()
    # a kill during the last item: its log line is cut and its map gone; the re-run redoes that item only
    log = runs / "x2" / "log" / "rank-1.jsonl"
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    victim = runs / "x2" / f"{last['outputs']}__{last['targets'][0]}.npy"
    victim.unlink()
    _run(args + ["--out", "x2"], runs, procs=2)
    assert victim.is_file() and json.loads((runs / "x2" / "explanations.json").read_text()) == index
    # other settings into the same folder are refused, naming the log
    p = _nemt(args[:-3] + ["--target", "all", "--no-progress", "--out", "x2"], runs)
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "other settings" in out
