"""Does the state precision change training? GPT-2 124M on a synthetic multi-source corpus, one run per precision.

HuggingFace ``GPT2LMHeadModel`` built from its config (no download), the same initial weights and the same
batches for every run: torch.optim.AdamW(fused=True) with float32 state as the baseline, then
also_fused.AdamW at each ``state_precision`` (fp32 params; bf16 autocast), and bf16 params with the
default state (torch's layout: bf16 moments), and bf16 params with 8-bit moments, rounded stochastically or to
nearest (does training need fp32 master weights?). Linear warm-up then cosine lr. The corpus: K = 4 sources, each an
order-1 Markov chain over its own slice of 256 tokens of the vocabulary with 4 successors per token
(transition rows drawn from Dirichlet distributions of different concentration: sources of different
entropy), mixed in each batch. Held-out loss on fixed batches every ``--eval-every`` steps.

Run: ``python3 benchmarks/state_precision/bench_convergence.py`` (CUDA). Writes
benchmarks/results/convergence_<gpu>.json and .png (``--smoke``: a tiny model on the CPU, to check
the script; results marked as such).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, BENCH)

import also_fused  # noqa: E402

RESULTS = os.path.join(BENCH, "results")
# (name, param dtype, optimizer factory)
RUNS = (
    ("torch AdamW fused, float32 state", torch.float32, lambda p, **kw: torch.optim.AdamW(p, fused=True, **kw)),
    ("also_fused AdamW float32", torch.float32, lambda p, **kw: also_fused.AdamW(p, state_precision="float32", **kw)),
    ("also_fused AdamW bfloat16", torch.float32, lambda p, **kw: also_fused.AdamW(p, state_precision="bfloat16", **kw)),
    ("also_fused AdamW int8", torch.float32, lambda p, **kw: also_fused.AdamW(p, state_precision="int8", **kw)),
    ("also_fused AdamW param (bf16 params)", torch.bfloat16,
     lambda p, **kw: also_fused.AdamW(p, state_precision="param", **kw)),
    ("also_fused AdamW int8, bf16 params, stochastic rounding", torch.bfloat16,
     lambda p, **kw: also_fused.AdamW(p, state_precision="int8", stochastic_rounding=True, rounding_seed=0, **kw)),
    ("also_fused AdamW int8, bf16 params, round to nearest", torch.bfloat16,
     lambda p, **kw: also_fused.AdamW(p, state_precision="int8", **kw)),
)


class Corpus:
    """K Markov sources over disjoint vocabulary slices; each token has ``fanout`` successors."""

    def __init__(self, vocab: int, sources: int, slice_size: int, fanout: int, seq: int, device: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.seq, self.device = seq, device
        self.offsets = [k * slice_size for k in range(sources)]
        assert self.offsets[-1] + slice_size <= vocab
        self.successors = torch.randint(0, slice_size, (sources, slice_size, fanout), generator=gen)
        # sources of different entropy: the Dirichlet concentration grows with k
        probs = [torch.distributions.Dirichlet(torch.full((fanout,), 0.1 * 4 ** k)).sample((slice_size,))
                 for k in range(sources)]
        self.probs = torch.stack(probs)
        self.slice_size = slice_size

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, len(self.offsets), (n,), generator=gen)
        tokens = torch.empty(n, self.seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.slice_size, (n,), generator=gen)
        for t in range(self.seq):
            prev = tokens[:, t]
            choice = torch.multinomial(self.probs[k, prev], 1, generator=gen).squeeze(1)
            tokens[:, t + 1] = self.successors[k, prev, choice]
        offsets = torch.tensor(self.offsets)[k].unsqueeze(1)
        return (tokens + offsets).to(self.device)  # [n, seq + 1]


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run_one(name, pdtype, make_opt, args, init_state, train_batches, eval_batches) -> dict:
    import transformers

    config = transformers.GPT2Config(**args.model_config)
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict(init_state)
    model = model.to(args.device, pdtype)
    opt = make_opt(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    def loss_of(tokens):
        with autocast:
            logits = model(tokens[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    curve, evals = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        loss = loss_of(train_batches[step % len(train_batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.detach())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                evals.append((step + 1, float(torch.stack([loss_of(b) for b in eval_batches]).mean())))
    train = [float(x) for x in torch.stack(curve).cpu()]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                if torch.is_tensor(t) and k != "step")
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: final held-out loss {evals[-1][1]:.4f}, train (last 20) {sum(train[-20:]) / 20:.4f}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return dict(impl=name, param_dtype=str(pdtype).replace("torch.", ""), train_loss=train, eval=evals,
                final_eval_loss=evals[-1][1], final_train_loss_last20=sum(train[-20:]) / 20,
                state_bytes_per_param=state / n)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in doc["runs"]:
        train = torch.tensor(r["train_loss"])
        k = 10
        smooth = torch.nn.functional.avg_pool1d(train[None, None], k, 1).flatten() if len(train) >= k else train
        ax1.plot(range(k, k + len(smooth)), smooth, label=r["impl"], lw=1)
        ax2.plot([s for s, _ in r["eval"]], [v for _, v in r["eval"]], marker="o", ms=3, label=r["impl"])
    ax1.set(xlabel="step", ylabel="training loss (10-step mean)", title="training loss")
    ax2.set(xlabel="step", ylabel="held-out loss", title="held-out loss")
    ax2.legend(fontsize=8)
    smoke = " (SMOKE RUN)" if doc["smoke"] else ""
    fig.suptitle(f"GPT-2 {doc['model']} on a synthetic multi-source corpus, {doc['steps']} steps: state precision"
                 f"{smoke}\n{doc['device']}, torch {doc['torch']}, {doc['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 20 steps, on the CPU")
    parser.add_argument("--out", default=None)
    parser.add_argument("--runs", default=None,
                        help="comma-separated indices into RUNS to train (default: all; the first is the baseline)")
    args = parser.parse_args()
    import transformers

    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.steps, args.batch, args.seq, args.warmup, args.eval_every = 20, 4, 32, 4, 10
        args.model_config = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=2048, n_positions=64)
        vocab, slice_size = 2048, 256
    else:
        args.model_config = dict()  # GPT-2 124M
        vocab, slice_size = 50257, 256
    torch.manual_seed(0)
    init_state = transformers.GPT2LMHeadModel(transformers.GPT2Config(**args.model_config)).state_dict()
    corpus = Corpus(vocab, 4, slice_size, 4, args.seq, args.device)
    gen = torch.Generator().manual_seed(1)
    train_batches = corpus.batch(args.steps * args.batch, gen).split(args.batch)  # every batch a fresh one
    eval_batches = corpus.batch(8 * args.batch, gen).split(args.batch)
    chosen = RUNS if args.runs is None else [RUNS[int(i)] for i in args.runs.split(",")]
    runs = [run_one(name, pdtype, make, args, init_state, train_batches, eval_batches)
            for name, pdtype, make in chosen]
    base = runs[0]["final_eval_loss"]
    for r in runs:
        r["final_eval_vs_baseline"] = r["final_eval_loss"] / base
    doc = dict(model="124M" if not args.smoke else "tiny", steps=args.steps, batch=args.batch, seq=args.seq,
               lr=args.lr, warmup=args.warmup, smoke=args.smoke, runs=runs,
               device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               date=datetime.date.today().isoformat())
    stem = args.out or os.path.join(RESULTS, "convergence_" + (
        "smoke" if args.smoke else torch.cuda.get_device_name().split()[-1].lower()))
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, stem + ".png")
    print("| run | final held-out loss | x baseline | train loss (last 20) | state bytes/param |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['impl']} | {r['final_eval_loss']:.4f} | {r['final_eval_vs_baseline']:.4f} | "
              f"{r['final_train_loss_last20']:.4f} | {r['state_bytes_per_param']:.2f} |")
    print("wrote", stem + ".json")


if __name__ == "__main__":
    main()
