"""DRO benchmark, GPU task: a small GPT on data sources of different difficulty and size.

K = 4 synthetic sources (no download), each a Markov chain over one shared vocabulary of 16 tokens
whose transition rows are drawn from a Dirichlet distribution: the smaller its concentration, the
lower the chain's entropy. Every document is 65 tokens of one chain (the first one or two tokens,
the chain's order, uniform); the model predicts tokens 2-65. The sources differ in entropy, in order (one chain of order 2, which
needs far more data to learn) and in size. Every source has its own validation and test documents
(equally many per source). The expected loss of a predictor that knows the source's chain is
computed exactly and reported beside the losses ("excess" = loss - that bound).

Methods (benchmarks/dro/dro_core.py): with n_groups = K (group = source) ERM, importance weighting
by source frequency, GroupDRO, RGD and ALSO (both modes, both reductions), and the rows that help
read them (ALSO with pi fixed on either reduction, ALSO's group-sum form with pi ~ 1/n); with
n_groups = the number of training documents (object-level weighting) GroupDRO and the four ALSO
variants. Every method gets the same number of Optuna TPE trials on the worst-source validation
loss (model selection over training time by the same objective), then seeds 0-4 with the tuned
setting.

    python benchmarks/dro/gpt_sources.py            # CUDA: the full task (sized for at most ~5 min on one H200)
    python benchmarks/dro/gpt_sources.py --smoke    # CPU: a tiny configuration (under a minute), for CI

Writes benchmarks/dro/results/gpt_sources.{json,png,md} (``--smoke``: gpt_sources_smoke.*, marked
as a smoke run inside).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dro_core as core  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 16
DOC_TOKENS = 65
# name, Markov order, Dirichlet concentration of the transition rows, training documents
SOURCES = (
    dict(name="large-easy", order=1, alpha=0.05, n_train=2400),
    dict(name="medium-noisy", order=1, alpha=0.5, n_train=1000),
    dict(name="small-order2", order=2, alpha=0.1, n_train=300),
    dict(name="tiny-easy", order=1, alpha=0.1, n_train=100),
)
N_VAL, N_TEST = 64, 256  # documents per source

FULL = dict(d_model=128, n_layer=2, n_head=4, epochs=7, batch=64, eval_every=30, data_scale=1.0)
SMOKE = dict(d_model=32, n_layer=1, n_head=2, epochs=1, batch=32, eval_every=4, data_scale=0.1)


# ------------------------------------------------------------------------------------------ data
def make_chain(order: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Transition probabilities, shape [V]*order + [V], rows ~ Dirichlet(alpha)."""
    shape = (VOCAB,) * order + (VOCAB,)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):  # Gamma sampling takes no generator: a seeded global one, restored after
        torch.manual_seed(seed)
        rows = torch._standard_gamma(torch.full(shape, alpha, dtype=torch.float64)).clamp_min(1e-300)
    return rows / rows.sum(-1, keepdim=True)


def sample_docs(chain: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n documents of DOC_TOKENS tokens: the first ``order`` tokens uniform, then the chain."""
    order = chain.dim() - 1
    docs = torch.empty(n, DOC_TOKENS, dtype=torch.long)
    docs[:, :order] = torch.randint(0, VOCAB, (n, order), generator=gen)
    flat = chain.reshape(-1, VOCAB)
    for t in range(order, DOC_TOKENS):
        ctx = torch.zeros(n, dtype=torch.long)
        for k in range(order):
            ctx = ctx * VOCAB + docs[:, t - order + k]
        docs[:, t] = torch.multinomial(flat[ctx], 1, generator=gen).squeeze(1)
    return docs


def chain_bound(chain: torch.Tensor) -> float:
    """Expected per-token loss (nats) over the model's DOC_TOKENS - 1 predictions of a predictor that
    knows the chain (the first ``order`` tokens are uniform)."""
    order = chain.dim() - 1
    row_entropy = -(chain * chain.clamp_min(1e-300).log()).sum(-1)  # [V]*order
    total = (order - 1) * math.log(VOCAB)  # order 2: token 2 is uniform given token 1
    state = torch.full((VOCAB,) * order, 1.0 / VOCAB ** order, dtype=torch.float64)
    for _ in range(order, DOC_TOKENS):
        total += float((state * row_entropy).sum())
        if order == 1:
            state = state @ chain
        else:  # p(b, c) = sum_a p(a, b) P[a, b, c]
            state = torch.einsum("ab,abc->bc", state, chain)
    return total / (DOC_TOKENS - 1)


# ----------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, d_model: int, n_layer: int, n_head: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(DOC_TOKENS - 1, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def doc_losses(model: nn.Module, docs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of every document (nats/token), shape [n_docs]."""
    logits = model(docs[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), docs[:, 1:].reshape(-1), reduction="none")
    return per_token.view(docs.shape[0], -1).mean(1)


# ------------------------------------------------------------------------------------------ task
class SourcesTask:
    name = "gpt_sources"
    direction = "minimize"
    objective_key = "worst_source_loss"
    tie_breaks = [("avg_loss", "minimize")]
    objective_text = "worst-source validation loss (nats/token), minimised"
    metric_text = ("per-source held-out loss (nats/token, the mean over its documents of the mean next-token "
                   "cross-entropy); worst_source_loss: the largest; avg_loss: their mean (equal documents per "
                   "source); *_excess: the same minus each source's chain bound (the expected loss of a "
                   "predictor that knows the chain)")
    space_overrides = {"lr": (1e-4, 1e-2)}
    default_grouping = "sources"

    def __init__(self, smoke: bool = False, device: str = "cpu", backend: str = "auto", **overrides) -> None:
        cfg = dict(SMOKE if smoke else FULL)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        self.cfg, self.smoke = cfg, smoke
        self.device = torch.device(device)
        self.backend = backend
        self.batch, self.epochs, self.eval_every = cfg["batch"], cfg["epochs"], cfg["eval_every"]
        self.worst_value = 10.0 * math.log(VOCAB)
        self.title = (f"Small GPT on {len(SOURCES)} Markov sources of different entropy, order and size "
                      f"(vocabulary {VOCAB}, {DOC_TOKENS}-token documents)")
        gen = torch.Generator().manual_seed(0)
        train, source_of, self.bounds, self.sizes = [], [], [], []
        self.held_out: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        for j, src in enumerate(SOURCES):
            chain = make_chain(src["order"], src["alpha"], gen)
            n_train = max(8, round(src["n_train"] * cfg["data_scale"]))
            n_val, n_test = (max(8, round(N_VAL * cfg["data_scale"])), max(8, round(N_TEST * cfg["data_scale"])))
            docs = sample_docs(chain, n_train + n_val + n_test, gen)
            train.append(docs[:n_train])
            source_of.append(torch.full((n_train,), j, dtype=torch.long))
            self.held_out["val"].append(docs[n_train:n_train + n_val].to(self.device))
            self.held_out["test"].append(docs[n_train + n_val:].to(self.device))
            self.bounds.append(chain_bound(chain))
            self.sizes.append(n_train)
        self.train_docs = torch.cat(train).to(self.device)
        sources = torch.cat(source_of)
        self.groupings = {"sources": sources, "documents": torch.arange(len(sources))}
        self.n_groups = {"sources": len(SOURCES), "documents": len(sources)}

    def make_model(self) -> nn.Module:
        return TinyGPT(self.cfg["d_model"], self.cfg["n_layer"], self.cfg["n_head"]).to(self.device)

    def losses(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return doc_losses(model, self.train_docs[idx])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        per_source = [float(doc_losses(model, docs).mean()) for docs in self.held_out[split]]
        excess = [loss - bound for loss, bound in zip(per_source, self.bounds)]
        return {"worst_source_loss": max(per_source), "avg_loss": sum(per_source) / len(per_source),
                "worst_source_excess": max(excess), "avg_excess": sum(excess) / len(excess),
                "source_loss": per_source}

    def describe_weights(self, w: torch.Tensor, grouping: str) -> dict[str, Any]:
        """The final weights per source (object level: each source's share of the document weights)."""
        src = self.groupings["sources"]
        if grouping == "sources":
            return {"final_weights": [round(float(v), 6) for v in w]}
        w = w.double()
        return {"weight_share_per_source": [round(float(w[src == j].sum() / w.sum()), 6) for j in range(len(SOURCES))]}

    def describe(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.make_model().parameters())
        return {"sources": [{**src, "n_train": n, "n_val": len(self.held_out["val"][j]),
                             "n_test": len(self.held_out["test"][j]), "chain_bound": b}
                            for j, (src, n, b) in enumerate(zip(SOURCES, self.sizes, self.bounds))],
                "vocab": VOCAB, "doc_tokens": DOC_TOKENS, "n_train_docs": len(self.train_docs),
                "model": f"GPT, {self.cfg['n_layer']} layers, d_model {self.cfg['d_model']}, "
                         f"{self.cfg['n_head']} heads, {n_params} params", "config": self.cfg,
                "groupings": dict(self.n_groups), "backend": self.backend}


def make_task(**kwargs) -> SourcesTask:
    return SourcesTask(**kwargs)


SOURCE_METHODS = ["ERM", "IW", "GroupDRO", "RGD", "ALSO opt sum", "ALSO opt mean", "ALSO DA sum", "ALSO DA mean",
                  "ALSO sum, pi fixed", "ALSO mean, pi fixed", "ALSO opt sum, pi ~ 1/n"]
DOCUMENT_METHODS = [f"{m} [documents]" for m in ("GroupDRO", "ALSO opt sum", "ALSO opt mean", "ALSO DA sum",
                                                  "ALSO DA mean")]
METRICS = [("worst_source_loss", "worst-source test loss"), ("avg_loss", "average test loss"),
           ("worst_source_excess", "worst-source excess"), ("avg_excess", "average excess")]


def run(smoke: bool, device: str, trials: int, seeds: int, workers: int, out: Path, backend: str = "auto",
        methods: list[str] | None = None, log=print) -> dict[str, Any]:
    task_kwargs = dict(smoke=smoke, device=device, backend=backend)
    task = make_task(**task_kwargs)
    methods = methods or SOURCE_METHODS + DOCUMENT_METHODS
    log(f"{task.title}; {task.describe()['model']}; {len(methods)} methods x ({trials} trials + {seeds} seeds) "
        f"on {device}, {workers} worker(s){' [SMOKE]' if smoke else ''}")
    t0 = time.perf_counter()
    results = core.run_methods([(make_task, task_kwargs, m) for m in methods], trials, seeds, workers, log=log)
    doc = core.results_document(task, results, trials, seeds, workers, time.perf_counter() - t0, extra={
        "omitted": {"ERM, RGD, ALSO sum, pi fixed [documents]": "they do not use groups: the same runs as with sources",
                    "IW, ALSO opt sum, pi ~ 1/n, ALSO mean, pi fixed [documents]":
                        "one group per document: every group frequency is 1, the same runs as ERM, ALSO opt sum and "
                        "ALSO sum, pi fixed"}})
    write(doc, out)
    log(f"wrote {out.with_suffix('.json')} ({doc['wall_s']:.0f} s)")
    return doc


def write(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    table = core.markdown_table(doc, METRICS, digits=3)
    label = "SMOKE RUN (a tiny configuration for CI; not results)\n\n" if doc["smoke"] else ""
    out.with_suffix(".md").write_text(f"# {doc['title']}\n\n{label}{doc['machine']}, torch {doc['torch']}, "
                                      f"{doc['date']}; {doc['protocol']['trials_per_method']} trials per method, "
                                      f"seeds {doc['protocol']['seeds']}; wall {doc['wall_s']:.0f} s.\n\n"
                                      f"Test losses in nats/token, mean ± std over seeds.\n\n{table}\n")
    core.plot(doc, METRICS[:2], out.with_suffix(".png"), "held-out loss (nats/token)", lower_is_better=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 1 trial, 1 seed (CPU, < 1 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", type=int, default=None, help="Optuna trials per method (default 8; smoke 1)")
    parser.add_argument("--seeds", type=int, default=None, help="test seeds (default 5; smoke 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="methods run in parallel processes (default 4 on CUDA, 1 on the CPU)")
    parser.add_argument("--backend", default="auto", help="also_fused backend for ALSO (auto, triton, reference)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/dro/results/gpt_sources[_smoke])")
    parser.add_argument("--replot", action="store_true", help="rewrite the table and plot from the JSON at --out")
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS / ("gpt_sources_smoke" if args.smoke else "gpt_sources")
    if args.replot:
        write(json.loads(out.with_suffix(".json").read_text()), out)
        return
    if args.device == "cpu":
        torch.set_num_threads(1)
    trials = args.trials if args.trials is not None else (1 if args.smoke else 8)
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 5)
    workers = args.workers if args.workers is not None else (4 if args.device.startswith("cuda") else 1)
    doc = run(args.smoke, args.device, trials, seeds, workers, out, args.backend, args.methods)
    print(core.markdown_table(doc, METRICS, digits=3))


if __name__ == "__main__":
    main()
