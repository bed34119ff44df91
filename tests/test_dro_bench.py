"""The DRO benchmark (benchmarks/dro): every task's pipeline in a tiny configuration (2 epochs or a
tiny GPT, 1-2 trials, 1 seed) writes a results JSON with the required fields and sane values; the
GroupDRO written out in the benchmark takes ALSO's pi step where the two are documented to agree."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import also_fused

DRO_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "dro"
sys.path.insert(0, str(DRO_DIR))
optuna = pytest.importorskip("optuna")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import dro_core  # noqa: E402
import gpt_sources  # noqa: E402
import run_cpu  # noqa: E402

pytestmark = pytest.mark.slow  # smoke runs of the DRO benchmark

TOP_FIELDS = ("task", "title", "machine", "date", "torch", "optuna", "smoke", "protocol", "data", "metrics",
              "wall_s", "results")
METHOD_FIELDS = ("method", "grouping", "n_groups", "search_space", "tuned_hparams", "best_val_objective",
                 "trials", "per_seed", "mean", "std", "tune_s", "seeds_s")


def check_document(doc: dict, trials: int, seeds: int, methods: list[str]) -> None:
    for field in TOP_FIELDS:
        assert field in doc, field
    assert doc["smoke"] is True
    assert doc["protocol"]["trials_per_method"] == trials
    assert doc["protocol"]["seeds"] == list(range(seeds))
    assert [r["method"] for r in doc["results"]] == methods
    for r in doc["results"]:
        for field in METHOD_FIELDS:
            assert field in r, (r["method"], field)
        assert len(r["trials"]) == trials
        assert len(r["per_seed"]) == seeds
        assert set(r["tuned_hparams"]) == set(r["search_space"])
        for name, value in r["tuned_hparams"].items():
            lo, hi = r["search_space"][name][:2]
            assert lo <= value <= hi, (r["method"], name, value)
        for run in r["per_seed"]:
            assert not run["diverged"]
            assert run["selected_step"] is not None and 0 < run["selected_step"] <= run["steps"]
        assert set(r["mean"]) == set(r["std"]) and r["mean"]
        for k, v in r["mean"].items():
            assert math.isfinite(v) and r["std"][k] >= 0.0, (r["method"], k)


def test_cpu_tasks_smoke(tmp_path):
    docs = run_cpu.run(list(run_cpu.TASK_METHODS), trials=2, seeds=1, workers=1, out_dir=tmp_path, smoke=True,
                       log=lambda line: None)
    for name, methods in run_cpu.TASK_METHODS.items():
        path = tmp_path / f"{name}_smoke.json"
        assert path.exists() and (tmp_path / f"{name}_smoke.png").stat().st_size > 10_000
        doc = json.loads(path.read_text())
        assert doc == json.loads(json.dumps(docs[name]))
        check_document(doc, trials=2, seeds=1, methods=methods)
        n_classes = 2 if name in ("spurious", "colored") else 10
        for r in doc["results"]:
            acc, worst = r["mean"]["acc"], r["mean"]["worst_group_acc"]
            assert 0.0 <= worst <= acc <= 100.0, (name, r["method"])
            assert r["per_seed"][0]["test"]["acc"] == acc
        erm = doc["results"][0]
        assert erm["mean"]["acc"] > 100.0 / n_classes + 15.0, "two epochs of ERM should beat chance clearly"
    noisy = json.loads((tmp_path / "noisy_labels_smoke.json").read_text())
    assert "IW" not in [r["method"] for r in noisy["results"]]
    assert all(r["n_groups"] == noisy["data"]["n_train"] for r in noisy["results"])
    also_rows = [r for r in noisy["results"] if r["method"].startswith("ALSO")]
    assert all(0.0 <= r["per_seed"][0]["weights"]["weight_on_flipped"] <= 1.0 for r in also_rows)


def test_gpt_sources_smoke(tmp_path):
    doc = gpt_sources.run(smoke=True, device="cpu", trials=1, seeds=1, workers=1, out=tmp_path / "gpt",
                          log=lambda line: None)
    methods = gpt_sources.SOURCE_METHODS + gpt_sources.DOCUMENT_METHODS
    check_document(json.loads((tmp_path / "gpt.json").read_text()), trials=1, seeds=1, methods=methods)
    n_docs = doc["data"]["n_train_docs"]
    bounds = [s["chain_bound"] for s in doc["data"]["sources"]]
    assert all(0.0 < b < math.log(gpt_sources.VOCAB) for b in bounds)
    for r in doc["results"]:
        assert r["n_groups"] == (n_docs if r["grouping"] == "documents" else len(gpt_sources.SOURCES))
        test = r["per_seed"][0]["test"]
        assert len(test["source_loss"]) == len(bounds)
        assert test["worst_source_loss"] == max(test["source_loss"]) >= test["avg_loss"] > 0.0
        # the held-out loss of a short training stays above each chain's bound and below 2x uniform
        assert all(b < loss < 2 * math.log(gpt_sources.VOCAB) for b, loss in zip(bounds, test["source_loss"]))


def test_chain_bound_is_the_empirical_loss_of_the_true_chain():
    gen = torch.Generator().manual_seed(3)
    for order in (1, 2):
        chain = gpt_sources.make_chain(order, 0.3, gen)
        docs = gpt_sources.sample_docs(chain, 4000, gen)
        flat = chain.reshape(-1, gpt_sources.VOCAB)
        nll = []
        for t in range(1, gpt_sources.DOC_TOKENS):
            if t < order:
                nll.append(torch.full((len(docs),), math.log(gpt_sources.VOCAB), dtype=torch.float64))
                continue
            ctx = docs[:, t - 1] if order == 1 else docs[:, t - 2] * gpt_sources.VOCAB + docs[:, t - 1]
            nll.append(-flat[ctx, docs[:, t]].log())
        empirical = float(torch.stack(nll).mean())
        assert abs(empirical - gpt_sources.chain_bound(chain)) < 0.02, order


@pytest.mark.parametrize("present", [4, 3])
def test_groupdro_q_step_is_also_descent_ascent_mean_pi_step(present):
    """ALSO descent-ascent, group_reduction="mean", pi_decay=0, temperature 1, pi_lr=eta: the same
    exponentiated-gradient step on the group mean losses as GroupDRO (up to the eps inside log(pi+eps));
    with the published group-sum reduction the step differs."""
    n_groups, batch, eta = 4, 12, 0.7
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(batch, 5, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    ids = torch.arange(batch) % present  # with present=3, group 3 is absent from the batch
    ids[1] = 0  # unequal counts

    def model_and_losses():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        return model, torch.nn.functional.cross_entropy(model(X), y, reduction="none")

    pis = {}
    for reduction in ("mean", "sum"):
        model, losses = model_and_losses()
        opt = also_fused.ALSO(model.parameters(), n_groups, batch_size=batch, mode="descent-ascent",
                              group_reduction=reduction, pi_lr=eta, pi_decay=0.0, pi_temperature=1.0)
        opt.weighted_loss(losses, ids).backward()
        opt.step()
        pis[reduction] = opt.pi.clone()
    dro = dro_core.GroupDRO(n_groups, eta, torch.device("cpu"))
    _, losses = model_and_losses()
    dro.loss(losses.detach(), ids)
    assert not torch.allclose(dro.q, torch.full((n_groups,), 1.0 / n_groups), atol=1e-3)
    torch.testing.assert_close(pis["mean"], dro.q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pis["sum"], dro.q, rtol=1e-3, atol=1e-4)
