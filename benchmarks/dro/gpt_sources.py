"""DRO benchmark, GPU task: a small GPT on data sources of different difficulty and size.

K = 4 synthetic sources (no download), each a Markov chain over one shared vocabulary of 16 tokens
whose transition rows are drawn from a Dirichlet distribution: the smaller its concentration, the
lower the chain's entropy. Every document is 65 tokens of one chain (the first one or two tokens,
the chain's order, uniform); the model predicts tokens 2-65. The sources differ in entropy, in order
(one chain of order 2, which needs far more data to learn) and in size. Every source has its own
validation and test documents (equally many per source). The expected loss of a predictor that knows
the source's chain is computed exactly and reported beside the losses ("excess" = loss - that bound).

Methods (benchmarks/dro/dro_core.py; the CPU tasks' names and protocol, benchmarks/dro/README.md), with
group = source: the AdamW baselines ERM, IW, GroupDRO, RGD, Upsampling, GroupDRO adj and CVaR, and the
same weightings on ALSO's Adam (ThetaAdam, coupled L2; ERM's is "ALSO sum, pi fixed"); ALSO in both
modes and both reductions and with the 1/n prior; ALSO's weights beside AdamW (GroupWeights, both modes
and reductions); the control "ALSO mean, pi fixed". With group = document (one weight per training
document): GroupDRO on either theta optimizer and the group-sum forms of ALSO and GroupWeights (CVaR, one
weight per document without groups, is in the first list). JTT is not run (see ``OMITTED``).

Protocol, as on the CPU tasks: every method gets the same number of Optuna TPE trials (default 24; TPE
starts with 10 random ones) on the worst-source validation loss, each one training run (seed 1000) with
model selection over training time by that objective; then seeds 0-9 with the tuned setting, tested at
the selected evaluation; sample std, 95% t intervals and paired same-seed differences against the
validation-chosen baselines (benchmarks/dro/dro_stats.py); ALSO's and GroupWeights' variants chosen on
validation. Every run records which evaluation was selected and how many there were, and the results
give the share of runs that selected the last one.

The model is tiny, so on CUDA a step costs about its host time (kernel launches): methods run in parallel
worker processes (one torch thread each) on the one GPU, and a method's seeds run as jobs of their own once
its search is done (the same runs as tune_and_test would make).

    python benchmarks/dro/gpt_sources.py --workers 12 --deadline 450 --out OUT/gpt_sources   # CUDA
    python benchmarks/dro/gpt_sources.py --resume OUT/gpt_sources.json --deadline 450 --out OUT/gpt_sources
    python benchmarks/dro/gpt_sources.py --part 1/2 --out A; ... --part 2/2 --out B
    python benchmarks/dro/gpt_sources.py --merge A.json B.json --out STEM      # the parts' one table
    python benchmarks/dro/gpt_sources.py --smoke                               # CPU: a tiny configuration

Writes benchmarks/dro/results/gpt_sources.{json,png,md} by default (``--smoke``: gpt_sources_smoke.*, marked
as a smoke run inside). ``--deadline S`` starts no job that would not end within S seconds of the start
(estimated from the searches done), stops what still runs at S and writes what is finished: the JSON's
``incomplete`` names the methods left and ``unfinished`` holds the searches done whose seeds are not;
``--resume`` on that JSON (or on the ``.partial.json`` a running job keeps up to date) goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dro_core as core  # noqa: E402
import dro_stats  # noqa: E402

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

# 10 epochs = 590 steps, an evaluation every 30 steps and at the end (20). Measured on the CPU (1 thread, the trial
# seed, earlier tuned settings): group-balanced upsampling peaks at step 390 (the tiny source overfits), GroupDRO's
# worst-source validation loss keeps falling to epoch 18 (the order-2 source is learnt late), ERM's, IW's and ALSO
# DA mean's fall slowly through 12 and ERM's through 20 epochs; of their evaluations up to step 570 the best is one
# of the last four. Longer training does not fit the GPU budget (benchmarks/dro/README.md, "Running").
FULL = dict(d_model=128, n_layer=2, n_head=4, epochs=10, batch=64, eval_every=30, data_scale=1.0)
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
        if self.device.type == "cuda":  # TF32 matmuls (float32 storage): the GPU time of a step, not its launches
            torch.backends.cuda.matmul.allow_tf32 = True
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
        # every split evaluated in one forward pass (one launch sequence, not one per source)
        self.held_out_cat = {split: torch.cat(docs) for split, docs in self.held_out.items()}
        self.held_out_sizes = {split: [len(d) for d in docs] for split, docs in self.held_out.items()}
        sources = torch.cat(source_of)
        self.groupings = {"sources": sources, "documents": torch.arange(len(sources))}
        self.n_groups = {"sources": len(SOURCES), "documents": len(sources)}

    def make_model(self) -> nn.Module:
        return TinyGPT(self.cfg["d_model"], self.cfg["n_layer"], self.cfg["n_head"]).to(self.device)

    def losses(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return doc_losses(model, self.train_docs[idx])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        per_doc = doc_losses(model, self.held_out_cat[split])
        per_source = torch.stack([part.mean() for part in per_doc.split(self.held_out_sizes[split])]).tolist()
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
                "groupings": dict(self.n_groups), "backend": self.backend,
                "tf32_matmul": self.device.type == "cuda"}


def make_task(**kwargs) -> SourcesTask:
    return SourcesTask(**kwargs)


# ---------------------------------------------------------------------------------------- methods
# group = source: the AdamW baselines, the same weightings on ALSO's Adam, ALSO's variants and its control,
# ALSO's weights on AdamW (the CPU tasks' rows, dro_core.METHODS, in their order, but for JTT)
SOURCE_METHODS = ["ERM", "IW", "GroupDRO", "RGD", "ALSO opt sum", "ALSO opt mean", "ALSO DA sum", "ALSO DA mean",
                  "ALSO sum, pi fixed", "ALSO mean, pi fixed", "ALSO opt sum, pi ~ 1/n",
                  "IW, ALSO's Adam", "GroupDRO, ALSO's Adam", "RGD, ALSO's Adam",
                  "GroupWeights opt sum + AdamW", "GroupWeights opt mean + AdamW", "GroupWeights DA sum + AdamW",
                  "GroupWeights DA mean + AdamW",
                  "Upsampling", "GroupDRO adj", "CVaR", "Upsampling, ALSO's Adam", "GroupDRO adj, ALSO's Adam",
                  "CVaR, ALSO's Adam"]
# group = training document (one weight per document)
DOCUMENT_METHODS = [f"{m} [documents]" for m in ("GroupDRO", "GroupDRO, ALSO's Adam", "ALSO opt sum", "ALSO DA sum",
                                                  "GroupWeights opt sum + AdamW", "GroupWeights DA sum + AdamW")]
ALL_METHODS = SOURCE_METHODS + DOCUMENT_METHODS
OMITTED = {
    "JTT, JTT, ALSO's Adam": "JTT's error set is the training samples its first model misclassifies; a next-token "
                             "model gets some tokens of every document wrong, so there is no such set to upweight",
    "ERM, RGD, CVaR, ALSO sum, pi fixed, RGD, ALSO's Adam, CVaR, ALSO's Adam [documents]":
        "they do not use the groups: the same runs as with sources",
    "Upsampling, Upsampling, ALSO's Adam [documents]":
        "one document per group: group-balanced sampling is uniform sampling with replacement",
    "IW, IW, ALSO's Adam, GroupDRO adj, GroupDRO adj, ALSO's Adam, ALSO opt sum, pi ~ 1/n, ALSO mean, pi fixed "
    "[documents]": "one document per group: every group frequency is 1, so IW is ERM, the adjustment one constant, "
                   "the 1/n prior uniform and the group-balanced loss the batch mean",
    "ALSO opt mean, ALSO DA mean, GroupWeights opt mean + AdamW, GroupWeights DA mean + AdamW [documents]":
        "one document per group: the same pi step as the group-sum forms, the model's loss differing only in its "
        "normalisation (in the earlier GPU run the mean and sum forms got the same tuned settings and test losses)",
}
METRICS = [("worst_source_loss", "worst-source test loss"), ("avg_loss", "average test loss"),
           ("worst_source_excess", "worst-source excess"), ("avg_excess", "average excess")]
# like for like: each weighting on AdamW and on ALSO's Adam (ALSO's weights on ALSO's Adam are ALSO itself)
PAIRS = [("none (ERM)", "ERM", "ALSO sum, pi fixed"), ("IW", "IW", "IW, ALSO's Adam"),
         ("Upsampling", "Upsampling", "Upsampling, ALSO's Adam"), ("GroupDRO", "GroupDRO", "GroupDRO, ALSO's Adam"),
         ("GroupDRO adj", "GroupDRO adj", "GroupDRO adj, ALSO's Adam"), ("RGD", "RGD", "RGD, ALSO's Adam"),
         ("CVaR", "CVaR", "CVaR, ALSO's Adam"),
         ("ALSO's weights DA sum", "GroupWeights DA sum + AdamW", "ALSO DA sum"),
         ("ALSO's weights DA mean", "GroupWeights DA mean + AdamW", "ALSO DA mean"),
         ("ALSO's weights opt sum", "GroupWeights opt sum + AdamW", "ALSO opt sum"),
         ("ALSO's weights opt mean", "GroupWeights opt mean + AdamW", "ALSO opt mean"),
         ("GroupDRO [documents]", "GroupDRO [documents]", "GroupDRO, ALSO's Adam [documents]"),
         ("ALSO's weights DA sum [documents]", "GroupWeights DA sum + AdamW [documents]", "ALSO DA sum [documents]"),
         ("ALSO's weights opt sum [documents]", "GroupWeights opt sum + AdamW [documents]",
          "ALSO opt sum [documents]")]


def relative_cost(method: str) -> float:
    """A method's cost per run relative to ERM on CUDA (an earlier H200 run: ALSO's source-level rows took about
    1.7x AdamW's); orders the jobs, longest first, so that the slow ones do not start last."""
    spec = core.method_spec(method)
    if spec["kind"] in ("also", "groupweights"):
        return 1.7 if spec["grouping"] is None else 1.2
    return 1.3 if spec.get("theta") == "coupled" else 1.0


# ------------------------------------------------------------------------------------------- jobs
_TASKS: dict[str, SourcesTask] = {}


def _cached_task(task_kwargs: dict) -> SourcesTask:
    key = json.dumps(task_kwargs, sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(**task_kwargs)
    return _TASKS[key]


def tune_job(task_kwargs: dict, method: str, trials: int, seeds: int, sampler_seed: int = 0) -> dict[str, Any]:
    """The search and seed 0 (dro_core.tune_and_test); the other seeds run as seed_job."""
    return core.tune_and_test(make_task, task_kwargs, method, trials, min(seeds, 1), sampler_seed)


def seed_job(task_kwargs: dict, method: str, hp: dict[str, float], seed: int) -> tuple[int, dict[str, Any], float]:
    """One test seed of a tuned method: the run tune_and_test would have made for it."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run = core.train_run(_cached_task(task_kwargs), method, hp, seed, evaluate_test=True)
    return seed, run, time.perf_counter() - t0


def complete_row(row: dict[str, Any], extra: list[tuple[int, dict[str, Any], float]]) -> dict[str, Any]:
    """tune_and_test's row (seed 0) with the other seeds' runs added, in seed order: the same per_seed, mean and
    std as tune_and_test with every seed; seeds_s the sum of the seed runs' times."""
    row = dict(row)
    extra = sorted(extra, key=lambda e: e[0])
    runs = row["per_seed"] + [run for _, run, _ in extra]
    row["per_seed"] = runs
    row["seeds_s"] += sum(s for _, _, s in extra)
    row.update(core.summarise(runs))
    return row


class State:
    """What a run has done: ``rows`` (finished methods) and ``searched`` (method -> (tune_and_test's row with
    seed 0, [(seed, run, seconds)] of the other seeds done)). Saved in the results JSON (``unfinished``) so that
    ``--resume`` goes on where a run stopped."""

    def __init__(self, rows: Optional[dict] = None, searched: Optional[dict] = None) -> None:
        self.rows: dict[str, dict[str, Any]] = dict(rows or {})
        self.searched: dict[str, tuple[dict[str, Any], list]] = dict(searched or {})

    def unfinished(self) -> dict[str, Any]:
        return {m: {"row": row, "other_seeds": [list(e) for e in extra]} for m, (row, extra) in self.searched.items()
                if m not in self.rows}

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "State":
        rows = {r["method"]: r for r in doc["results"]}
        searched = {m: (u["row"], [tuple(e) for e in u["other_seeds"]]) for m, u in (doc.get("unfinished") or {}).items()}
        return cls(rows, searched)


def run_jobs(task_kwargs: dict, methods: list[str], trials: int, seeds: int, workers: int,
             log: Callable[[str], None] = print, deadline: Optional[float] = None,
             on_change: Optional[Callable[[State], None]] = None, state: Optional[State] = None) -> State:
    """Tune and test every method of ``methods`` not finished in ``state``. With ``workers`` > 1: spawned worker
    processes, at most ``workers`` jobs at a time: the searches (tune_job, longest first) before the seed jobs
    (each method's seeds 1.. once its search is done), except that near ``deadline`` (a time.perf_counter()
    value) no job is started that would not end before it (estimated from the searches done); past it the jobs
    still running are stopped. Returns the state (every method finished unless the deadline came first)."""
    state = state or State()

    def changed() -> None:
        if on_change is not None:
            on_change(state)

    def seed_done(method: str, result: tuple) -> None:
        row, extra = state.searched[method]
        extra.append(tuple(result))
        if len(extra) == seeds - 1:
            state.rows[method] = complete_row(row, extra)
            log(core.summary_line(state.rows[method]))

    todo = [m for m in methods if m not in state.rows]
    searches = [m for m in sorted(todo, key=relative_cost, reverse=True) if m not in state.searched]
    seed_queue = [(m, s) for m in todo if m in state.searched
                  for s in range(1, seeds) if s not in {e[0] for e in state.searched[m][1]}]
    for m in todo:  # searched, no seed left to run (seeds == 1, or resumed with every seed done)
        if m in state.searched and len(state.searched[m][1]) == seeds - 1:
            state.rows[m] = complete_row(*state.searched[m])
    if workers <= 1:
        for method, seed in seed_queue:
            seed_done(method, seed_job(task_kwargs, method, state.searched[method][0]["tuned_hparams"], seed))
        for method in searches:
            if deadline is not None and time.perf_counter() > deadline:
                break
            state.searched[method] = (tune_job(task_kwargs, method, trials, seeds), [])
            if seeds == 1:
                state.rows[method] = complete_row(*state.searched[method])
                log(core.summary_line(state.rows[method]))
            for s in range(1, seeds):
                seed_done(method, seed_job(task_kwargs, method, state.searched[method][0]["tuned_hparams"], s))
            changed()
        return state

    unit: list[float] = []  # seconds per run and unit of relative_cost, from the searches done

    def fits(method: str, runs: int) -> bool:
        if deadline is None or not unit:
            return deadline is None or time.perf_counter() < deadline
        need = statistics.median(unit) * relative_cost(method) * runs
        return time.perf_counter() + 1.1 * need < deadline

    started = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers)
    running: dict[Any, tuple[str, str, int]] = {}
    stopped = False
    try:
        while True:
            while len(running) < workers:  # start what fits: the searches first, then the seeds
                job = None
                fitting = [m for m in searches if fits(m, trials + 1)]
                if fitting:
                    m = fitting[0]
                    searches.remove(m)
                    job = (pool.apply_async(tune_job, (task_kwargs, m, trials, seeds)), ("tune", m, 0))
                else:
                    for i, (m, s) in enumerate(seed_queue):
                        if fits(m, 1):
                            seed_queue.pop(i)
                            hp = state.searched[m][0]["tuned_hparams"]
                            job = (pool.apply_async(seed_job, (task_kwargs, m, hp, s)), ("seed", m, s))
                            break
                if job is None:
                    break
                running[job[0]] = job[1]
            if not running:
                break
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
            done = [job for job in running if job.ready()]
            if not done:
                time.sleep(0.05)
                continue
            for job in done:
                kind, method, _ = running.pop(job)
                result = job.get()  # a worker's exception is raised here
                if kind == "tune":
                    state.searched[method] = (result, [])
                    unit.append(result["tune_s"] / (trials * relative_cost(method)))
                    log(f"  searched {method} ({result['tune_s']:.0f} s; {time.perf_counter() - started:.0f} s "
                        f"since the start, {len(running)} jobs running, {len(searches)} searches waiting)")
                    if seeds == 1:
                        state.rows[method] = complete_row(result, [])
                        log(core.summary_line(state.rows[method]))
                    seed_queue.extend((method, s) for s in range(1, seeds))
                else:
                    seed_done(method, result)
                changed()
    finally:
        if running:
            pool.terminate()
        else:
            pool.close()
        pool.join()
    left = [m for m in methods if m not in state.rows]
    if left:
        log(f"{'deadline passed' if stopped else 'stopped before the deadline'}: {len(state.rows)} of "
            f"{len(methods)} methods finished; not finished: {', '.join(left)} (--resume goes on)")
    return state


# ------------------------------------------------------------------------------- model selection
def eval_schedule(n_docs: int, batch: int, epochs: int, eval_every: Optional[int]) -> tuple[int, int, int]:
    """(steps per epoch, steps of a run, eval_every) as dro_core.train_run uses them: an evaluation every
    eval_every steps and one at the end."""
    per_epoch = n_docs // batch
    return per_epoch, per_epoch * epochs, eval_every or per_epoch


def eval_steps(task: SourcesTask) -> tuple[int, int, int]:
    return eval_schedule(len(task.train_docs), task.batch, task.epochs, task.eval_every)


def evaluations_up_to(step: int, total: int, every: int) -> int:
    """How many evaluations a run has made by the end of ``step``."""
    return step // every + (1 if step == total and step % every else 0)


def record_selection(row: dict[str, Any], schedule: tuple[int, int, int]) -> None:
    """Adds to every run (seed runs and search trials) ``selected_eval`` (1-based index of the evaluation model
    selection kept), ``n_evals`` (the run's evaluations) and ``selected_last``; diverged runs get None (a
    diverged trial does not record where it stopped). ``row["selection"]`` counts them."""
    per_epoch, total, every = schedule
    runs = []
    for run in row["per_seed"]:
        ok = run.get("selected_step") is not None and not run["diverged"]
        run["selected_eval"] = evaluations_up_to(run["selected_step"], total, every) if ok else None
        run["n_evals"] = evaluations_up_to(run["steps"], total, every) if ok else None
        run["selected_last"] = run["selected_eval"] == run["n_evals"] if ok else None
        runs.append(("seeds", run))
    for trial in row["trials"]:
        ok = trial.get("selected_epoch") is not None and not trial.get("diverged")
        step = round(trial["selected_epoch"] * per_epoch) if ok else None
        trial["selected_eval"] = evaluations_up_to(step, total, every) if ok else None
        trial["n_evals"] = evaluations_up_to(total, total, every) if ok else None
        trial["selected_last"] = trial["selected_eval"] == trial["n_evals"] if ok else None
        runs.append(("trials", trial))
    row["selection"] = {kind: selection_counts([r for k, r in runs if k == kind]) for kind in ("trials", "seeds")}


def selection_counts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r.get("selected_last") is not None]
    last = sum(bool(r["selected_last"]) for r in done)
    fractions = [r["selected_eval"] / r["n_evals"] for r in done]
    return {"runs": len(runs), "not_diverged": len(done), "selected_last": last,
            "share_selected_last": last / len(done) if done else None,
            "median_selected_fraction": statistics.median(fractions) if fractions else None}


def selection_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The share of runs (trials, seeds, both) whose selected evaluation was the last one, over every method."""
    out = {}
    for kind in ("trials", "seeds", "all"):
        runs = [r for row in rows for k in (("trials", "seeds") if kind == "all" else (kind,))
                for r in (row["trials"] if k == "trials" else row["per_seed"])]
        out[kind] = selection_counts(runs)
    out["note"] = ("selected_eval / n_evals per run: the evaluation model selection kept (1-based) among the run's "
                   "evaluations; a run whose last evaluation is its best may still have been improving")
    return out


# ------------------------------------------------------------------------------------------- run
def run(smoke: bool, device: str, trials: int, seeds: int, workers: int, out: Path, backend: str = "auto",
        methods: Optional[list[str]] = None, log=print, deadline_s: Optional[float] = None,
        part: Optional[str] = None, resume: Optional[dict[str, Any]] = None,
        overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Tune and test ``methods`` (default all), write ``out``.{json,md,png} and return the document. While it runs,
    ``out``.partial.json holds what is done (removed at the end); ``deadline_s``: stop after that many seconds
    (the document's ``incomplete`` and ``unfinished`` say what is left); ``resume``: a document such a run wrote
    (the same configuration), whose finished methods and searches are kept."""
    t0 = time.perf_counter()
    task_kwargs = dict(smoke=smoke, device=device, backend=backend, **(overrides or {}))
    task = make_task(**task_kwargs)
    state = State()
    earlier: list[dict[str, Any]] = []
    if resume is not None:
        if resume["data"]["config"] != task.cfg or resume["protocol"]["trials_per_method"] != trials or \
                resume["protocol"]["seeds"] != list(range(seeds)) or resume["smoke"] != smoke:
            raise SystemExit("--resume: the document was made with another configuration, trials or seeds")
        state = State.from_document(resume)
        earlier = list(resume.get("sessions") or []) + [session_of(resume)]
        methods = list(dict.fromkeys((resume.get("methods_requested") or []) + (methods or [])))
    methods = methods or ALL_METHODS
    log(f"{task.title}; {task.describe()['model']}; {len(methods)} methods x ({trials} trials + {seeds} seeds) "
        f"of {eval_steps(task)[1]} steps on {device}, {workers} worker(s){' [SMOKE]' if smoke else ''}"
        + (f"; resumed: {len(state.rows)} methods finished, {len(state.searched)} searched" if resume else ""))
    deadline = None if deadline_s is None else t0 + deadline_s

    def document(state: State) -> dict[str, Any]:
        results = [state.rows[m] for m in methods if m in state.rows]
        missing = [m for m in methods if m not in state.rows]
        wall = time.perf_counter() - t0
        extra = {"omitted": OMITTED, "part": part, "methods_requested": methods, "host": host(),
                 "incomplete": {"methods_not_finished": missing, "deadline_s": deadline_s} if missing else None,
                 "unfinished": state.unfinished() or None, "sessions": earlier or None}
        doc = core.results_document(task, results, trials, seeds, workers, wall + sum(e["wall_s"] for e in earlier),
                                    extra=extra)
        if earlier:
            doc["wall_s_note"] = "the sum of the sessions' wall times (sessions: the earlier ones, resumed)"
        return doc

    partial = out.with_name(out.name + ".partial.json")

    written = [0.0]

    def checkpoint(state: State) -> None:  # what a run stopped from outside still leaves (--resume reads it)
        if time.perf_counter() - written[0] < 10.0:  # at most every 10 s: the document grows to megabytes
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(document(state)) + "\n")
        written[0] = time.perf_counter()

    state = run_jobs(task_kwargs, methods, trials, seeds, workers, log=log, deadline=deadline,
                     on_change=None if smoke else checkpoint, state=state)
    doc = document(state)
    write(doc, out)
    if partial.exists():
        partial.unlink()
    log(f"wrote {out.with_suffix('.json')} ({time.perf_counter() - t0:.0f} s)")
    return doc


# what identifies where and when a document was made (kept per session of a resumed run and per merged part)
ENVIRONMENT_KEYS = ("commit", "machine", "platform", "date", "torch", "optuna", "also_fused", "python", "host")


def session_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {**{k: doc.get(k) for k in ENVIRONMENT_KEYS}, "wall_s": doc["wall_s"] - sum(e["wall_s"] for e in doc.get("sessions") or []),
            "workers": doc["protocol"]["workers"], "methods_finished": [r["method"] for r in doc["results"]]}


def host() -> dict[str, Any]:
    return {"cpu": core.cpu_model(), "cores": os.cpu_count(), "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def finalise(doc: dict[str, Any]) -> dict[str, Any]:
    """Selection counts per run and overall, then dro_stats' intervals, paired differences and the entries chosen
    on validation (losses: lower is better)."""
    p = doc["protocol"]
    schedule = eval_schedule(doc["data"]["n_train_docs"], p["batch"], p["epochs"], p["eval_every_steps"])
    for row in doc["results"]:
        record_selection(row, schedule)
    doc["model_selection"] = selection_summary(doc["results"])
    dro_stats.annotate(doc, [k for k, _ in METRICS], higher_is_better=False)
    return doc


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """One document from parts run apart (``--part`` or ``--methods``): the same task, configuration and protocol
    required; the rows in the canonical order; every part's machine, commit, date and wall time kept."""
    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]
    same = ("task", "smoke")
    for d in docs[1:]:
        for k in same:
            if d[k] != first[k]:
                raise SystemExit(f"cannot merge: {k} differs ({d[k]!r} vs {first[k]!r})")
        proto = {k: v for k, v in d["protocol"].items() if k != "workers"}
        if proto != {k: v for k, v in first["protocol"].items() if k != "workers"}:
            raise SystemExit("cannot merge: the protocols differ")
        if d["data"]["config"] != first["data"]["config"]:
            raise SystemExit("cannot merge: the task configurations differ")
    rows: dict[str, dict] = {}
    for d in docs:
        for r in d["results"]:
            if r["method"] in rows:
                raise SystemExit(f"cannot merge: {r['method']} is in two parts")
            rows[r["method"]] = r
    order = [m for m in ALL_METHODS if m in rows] + [m for m in rows if m not in ALL_METHODS]
    parts = [{"file": Path(p).name, **{k: d.get(k) for k in ENVIRONMENT_KEYS + ("wall_s",)}, "workers": d["protocol"]["workers"],
              "methods": [r["method"] for r in d["results"]], "incomplete": d.get("incomplete")}
             for p, d in zip(paths, docs)]
    doc = dict(first)
    for k in ("commit", "machine", "date", "torch", "also_fused"):
        values = sorted({str(d.get(k)) for d in docs})
        doc[k] = values[0] if len(values) == 1 else "parts differ: " + ", ".join(values)
    doc["wall_s"] = sum(d["wall_s"] for d in docs)
    doc["wall_s_note"] = "the sum of the parts' wall times (see parts)"
    doc["parts"] = parts
    doc["part"] = None
    missing = [m for m in ALL_METHODS if m not in rows]
    doc["incomplete"] = {"methods_not_run": missing} if missing else None
    doc["results"] = [rows[m] for m in order]
    unfinished = {m: u for d in docs for m, u in (d.get("unfinished") or {}).items() if m not in rows}
    doc["unfinished"] = unfinished or None
    doc["methods_requested"] = list(dict.fromkeys(m for d in docs for m in d.get("methods_requested") or []))
    for k in ("best_baseline", "best_baseline_also_adam", "selected_on_validation", "statistics"):
        doc.pop(k, None)
    write(doc, out)
    return doc


# ------------------------------------------------------------------------------------------ output
def fmt(stats: Optional[dict], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}" if stats else "n/a"


def fmt_diff(p: Optional[dict], digits: int = 3) -> str:
    return f"{p['mean']:+.{digits}f} ± {p['ci95']:.{digits}f} ({p['verdict']})" if p else "n/a"


def selected_table(doc: dict[str, Any]) -> str:
    """The validation-chosen rows only, ranked by test worst-source loss: the two references (the best AdamW
    baseline and the best baseline on ALSO's Adam, by validation) and the ALSO and GroupWeights entries (their
    variant chosen by validation)."""
    rows = {r["method"]: r for r in doc["results"]}
    key = METRICS[0][0]
    base, theta = doc.get("best_baseline"), doc.get("best_baseline_also_adam")
    entries = []
    for name, role, among in ((base, "AdamW reference", dro_stats.BASELINES),
                              (theta, "ALSO's Adam reference", dro_stats.THETA_BASELINES)):
        if name:
            entries.append((name, role, among))
    for name in doc.get("selected_on_validation", []):
        among = dro_stats.ALSO_VARIANTS if name in dro_stats.ALSO_VARIANTS else dro_stats.GROUPWEIGHTS_VARIANTS
        entries.append((name, "ALSO entry" if among is dro_stats.ALSO_VARIANTS else "GroupWeights entry", among))
    entries.sort(key=lambda e: rows[e[0]]["stats"].get(key, {}).get("mean", math.inf))
    lines = [f"| rank | entry | chosen on validation among | validation objective | {METRICS[0][1]} | "
             f"{METRICS[1][1]} | minus {base} (paired) | minus {theta} (paired) |", "|---|---|---|---|---|---|---|---|"]
    for i, (name, role, among) in enumerate(entries, 1):
        r = rows[name]
        present = [m for m in among if m in rows]
        vs = ["(the reference)" if name == ref else fmt_diff(r.get(field, {}).get(key))
              for ref, field in ((base, "vs_best_baseline"), (theta, "vs_best_baseline_also_adam"))]
        lines.append(f"| {i} | {role}: {name} | {', '.join(present)} | {r['best_val_objective']:.3f} | "
                     f"{fmt(r['stats'].get(key))} | {fmt(r['stats'].get(METRICS[1][0]))} | {vs[0]} | {vs[1]} |")
    return "\n".join(lines)


def pairs_table(doc: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in doc["results"]}
    key = METRICS[0][0]
    lines = [f"| weighting | AdamW: {METRICS[0][1]} | ALSO's Adam: {METRICS[0][1]} | ALSO's Adam minus AdamW (paired) |",
             "|---|---|---|---|"]
    for label, a, b in PAIRS:
        if a in rows and b in rows:
            p = dro_stats.paired(rows[b], rows[a], key, "minimize")
            lines.append(f"| {label} | {fmt(rows[a]['stats'].get(key))} | {fmt(rows[b]['stats'].get(key))} | "
                         f"{fmt_diff(p)} |")
    return "\n".join(lines)


def rows_table(doc: dict[str, Any]) -> str:
    """Every row (the per-variant rows are ablations): test metrics with 95% intervals, the paired differences
    of the worst-source loss from both references, where model selection stopped, the tuned setting."""
    key = METRICS[0][0]
    base, theta = doc.get("best_baseline"), doc.get("best_baseline_also_adam")
    lines = ["| method | groups | " + " | ".join(f"{label}" for _, label in METRICS)
             + f" | minus {base} | minus {theta} | last evaluation selected (trials, seeds) | tuned |",
             "|" + "---|" * (len(METRICS) + 7)]
    for r in doc["results"]:
        cells = [fmt(r["stats"].get(k)) for k, _ in METRICS]
        vs = ["(the reference)" if r["method"] == ref else fmt_diff(r.get(field, {}).get(key))
              for ref, field in ((base, "vs_best_baseline"), (theta, "vs_best_baseline_also_adam"))]
        sel = r.get("selection", {})
        last = ", ".join(f"{s['selected_last']}/{s['not_diverged']}" for s in (sel.get("trials"), sel.get("seeds")) if s)
        name = r["method"] + (" (selected on validation)" if r["method"] in doc.get("selected_on_validation", []) else "")
        hp = ", ".join(f"{k}={v:.2g}" for k, v in r["tuned_hparams"].items())
        lines.append(f"| {name} | {r['grouping']} ({r['n_groups']}) | " + " | ".join(cells + vs)
                     + f" | {last} | {hp} |")
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    finalise(doc)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    p, sel = doc["protocol"], doc["model_selection"]
    label = "SMOKE RUN (a tiny configuration for CI; not results)\n\n" if doc["smoke"] else ""
    incomplete = doc.get("incomplete")
    if incomplete:
        missing = incomplete.get("methods_not_finished") or incomplete.get("methods_not_run")
        label += f"INCOMPLETE: not in this file: {', '.join(missing)}.\n\n"
    host_info = doc.get("host") or {}
    share = lambda s: (f"{s['selected_last']} of {s['not_diverged']} ({100 * s['share_selected_last']:.0f}%)"
                       if s["share_selected_last"] is not None else "n/a")
    text = (f"# {doc['title']}\n\n{label}{doc['machine']} ({host_info.get('cores', '?')} CPU cores), torch {doc['torch']}, "
            f"optuna {doc['optuna']}, {doc['date']}, commit {doc.get('commit', 'not recorded')}; "
            f"{p['trials_per_method']} Optuna TPE trials per method on the {p['objective']}, then seeds "
            f"{p['seeds'][0]}-{p['seeds'][-1]}; {p['epochs']} epochs of batch {p['batch']}, an evaluation every "
            f"{p['eval_every_steps']} steps and at the end; {p['workers']} worker processes; wall "
            f"{doc['wall_s']:.0f} s.\n\n"
            f"Model selection kept the last evaluation in {share(sel['all'])} runs (search trials {share(sel['trials'])}, "
            f"seed runs {share(sel['seeds'])}); the median selected evaluation was at "
            f"{100 * (sel['all']['median_selected_fraction'] or 0):.0f}% of its run's evaluations.\n\n"
            f"Test losses in nats/token: mean ± the half-width of the 95% t interval over the seeds; differences "
            f"paired seed by seed, a verdict only where the interval excludes zero (negative: lower loss than the "
            f"reference).\n\n"
            f"## The entries chosen on validation, ranked\n\n{selected_table(doc)}\n\n"
            f"## Like for like: each weighting on AdamW and on ALSO's Adam\n\n{pairs_table(doc)}\n\n"
            f"## Every row (the variants are ablations, not ranked)\n\n{rows_table(doc)}\n")
    out.with_suffix(".md").write_text(text)
    core.plot(doc, METRICS[:2], out.with_suffix(".png"), "held-out loss (nats/token)", lower_is_better=True)


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 1 trial, 1 seed (CPU, < 1 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", type=int, default=None, help="Optuna trials per method (default 24; smoke 1)")
    parser.add_argument("--seeds", type=int, default=None, help="test seeds (default 10; smoke 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel worker processes, one torch thread each (default 12 on CUDA, 1 on the CPU)")
    parser.add_argument("--backend", default="auto", help="also_fused backend for ALSO (auto, triton, reference)")
    parser.add_argument("--methods", nargs="*", default=None, choices=ALL_METHODS, help="a subset of the methods")
    parser.add_argument("--part", default=None, metavar="K/N",
                        help="run the K-th of N shares of the methods (balanced by cost); merge the parts with --merge")
    parser.add_argument("--deadline", type=float, default=None, metavar="S",
                        help="start no job that would end more than S seconds after the start (estimated from the "
                             "searches done), stop what still runs at S, and write what is finished (--resume goes on)")
    parser.add_argument("--resume", default=None, metavar="JSON",
                        help="go on from a results JSON (or its .partial.json) that a stopped run wrote")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {FULL['epochs']})")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"steps between evaluations (default {FULL['eval_every']})")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/dro/results/gpt_sources[_smoke])")
    parser.add_argument("--replot", action="store_true", help="rewrite the table and plot from the JSON at --out")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="merge the results JSON of parts into --out (statistics recomputed over every row)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS / ("gpt_sources_smoke" if args.smoke else "gpt_sources")
    if args.merge:
        doc = merge([Path(p) for p in args.merge], out)
        print(f"merged {len(args.merge)} parts, {len(doc['results'])} methods, into {out.with_suffix('.json')}")
        return
    if args.replot:
        write(json.loads(out.with_suffix(".json").read_text()), out)
        return
    torch.set_num_threads(1)
    trials = args.trials if args.trials is not None else (1 if args.smoke else 24)
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 10)
    workers = args.workers if args.workers is not None else (12 if args.device.startswith("cuda") else 1)
    methods = args.methods or ALL_METHODS
    if args.part and args.resume:
        parser.error("--resume goes on with the methods the stopped run was given; no --part")
    if args.part:
        k, n = (int(v) for v in args.part.split("/"))
        methods = split_methods(methods, n)[k - 1]
    deadline = None if args.deadline is None else args.deadline - (time.perf_counter() - t_start)
    resume = json.loads(Path(args.resume).read_text()) if args.resume else None
    overrides = {k: v for k, v in (("epochs", args.epochs), ("eval_every", args.eval_every)) if v is not None}
    doc = run(args.smoke, args.device, trials, seeds, workers, out, args.backend,
              args.methods if args.resume else methods, deadline_s=deadline,
              part=args.part, resume=resume, overrides=overrides)
    print(rows_table(doc))


def split_methods(methods: list[str], n: int) -> list[list[str]]:
    """n shares of the methods of about equal cost (relative_cost), each in the canonical order."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for m in sorted(methods, key=relative_cost, reverse=True):
        i = load.index(min(load))
        shares[i].append(m)
        load[i] += relative_cost(m)
    return [[m for m in methods if m in share] for share in shares]


if __name__ == "__main__":
    main()
