"""The DRO benchmark (benchmarks/dro): every task's pipeline in a tiny configuration (2 epochs or a
tiny GPT, 1-2 trials, 1 seed) writes a results JSON with the required fields and sane values (marked
slow); the GroupDRO written out in the benchmark takes ALSO's pi step where the two are documented to
agree; the colored task's groups and colour correlation are as parameterised and the validation splits
are drawn like the test splits; the field's baselines do what they say (upsampling draws the groups
balanced, JTT upweights exactly what its first model misclassifies, the Sagawa adjustment adds
C / sqrt(n_g), CVaR averages the largest losses): a few seconds."""
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


@pytest.mark.slow  # a smoke run of every CPU task and method
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
        if name != "colored":  # (two epochs of ERM read the colour, worth exactly 50% on the colour-balanced test)
            assert erm["mean"]["acc"] > 100.0 / n_classes + 15.0, "two epochs of ERM should beat chance clearly"
    noisy = json.loads((tmp_path / "noisy_labels_smoke.json").read_text())
    assert "IW" not in [r["method"] for r in noisy["results"]]
    assert all(r["n_groups"] == noisy["data"]["n_train"] for r in noisy["results"])
    also_rows = [r for r in noisy["results"] if r["method"].startswith("ALSO")]
    assert all(0.0 <= r["per_seed"][0]["weights"]["weight_on_flipped"] <= 1.0 for r in also_rows)


@pytest.mark.slow
def test_gpt_sources_smoke(tmp_path):
    doc = gpt_sources.run(smoke=True, device="cpu", trials=1, seeds=1, workers=1, out=tmp_path / "gpt",
                          log=lambda line: None)
    methods = gpt_sources.SOURCE_METHODS + gpt_sources.DOCUMENT_METHODS
    written = json.loads((tmp_path / "gpt.json").read_text())
    check_document(written, trials=1, seeds=1, methods=methods)
    assert not (tmp_path / "gpt.partial.json").exists()
    for field in ("commit", "machine", "platform", "date", "torch", "optuna", "also_fused", "python", "host"):
        assert written[field], field
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
        for run in r["per_seed"] + r["trials"]:  # where model selection stopped, per run
            assert 1 <= run["selected_eval"] <= run["n_evals"] == 3  # 11 steps, every 4 and at the end
            assert run["selected_last"] == (run["selected_eval"] == 3)
    sel = written["model_selection"]["all"]
    assert sel["runs"] == 2 * len(methods)
    assert sel["selected_last"] == sum(run["selected_last"] for r in doc["results"] for run in r["per_seed"] + r["trials"])
    # the statistics of the CPU tasks: both references and both entries chosen on validation
    assert written["best_baseline"] in gpt_sources.dro_stats.BASELINES
    assert written["best_baseline_also_adam"] in gpt_sources.dro_stats.THETA_BASELINES
    chosen = written["selected_on_validation"]
    assert len(chosen) == 2 and chosen[0] in gpt_sources.dro_stats.ALSO_VARIANTS
    assert chosen[1] in gpt_sources.dro_stats.GROUPWEIGHTS_VARIANTS
    text = (tmp_path / "gpt.md").read_text()
    assert "SMOKE RUN" in text and "ranked" in text and "Like for like" in text


def test_gpt_sources_like_for_like_rows():
    """Every weighting the GPU task runs on AdamW also runs on ALSO's Adam (and ALSO's weights on both)."""
    methods = set(gpt_sources.ALL_METHODS)
    for _, adamw, also_adam in gpt_sources.PAIRS:
        assert adamw in methods and also_adam in methods
        assert dro_core.method_spec(adamw).get("theta") is None
        spec = dro_core.method_spec(also_adam)
        assert spec.get("theta") == "coupled" or spec["kind"] == "also"
    for name in gpt_sources.dro_stats.BASELINES + gpt_sources.dro_stats.THETA_BASELINES:
        assert name in methods or name.startswith("JTT")
    for name in gpt_sources.dro_stats.ALSO_VARIANTS + gpt_sources.dro_stats.GROUPWEIGHTS_VARIANTS:
        assert name in methods
    shares = gpt_sources.split_methods(gpt_sources.ALL_METHODS, 2)
    assert sorted(shares[0] + shares[1]) == sorted(gpt_sources.ALL_METHODS) and not set(shares[0]) & set(shares[1])


def test_gpt_sources_selected_evaluation_is_the_one_train_run_kept():
    task = gpt_sources.make_task(smoke=True, epochs=2, eval_every=5)  # 22 steps: evaluations at 5, 10, 15, 20, 22
    seen = []
    evaluate = task.evaluate

    def recording(model, split):
        metrics = evaluate(model, split)
        if split == "val":
            seen.append(metrics)
        return metrics

    task.evaluate = recording
    schedule = gpt_sources.eval_steps(task)
    assert schedule == (11, 22, 5)
    for hp in (dict(lr=3e-3, weight_decay=1e-4), dict(lr=3e-2, weight_decay=1e-4), dict(lr=1e-4, weight_decay=1e-4)):
        seen.clear()
        run = dro_core.train_run(task, "ERM", hp, seed=0, evaluate_test=False)
        keys = [dro_core.selection_key(task, m) for m in seen]
        first_best = keys.index(max(keys)) + 1
        assert len(seen) == 5 == gpt_sources.evaluations_up_to(run["steps"], 22, 5)
        assert gpt_sources.evaluations_up_to(run["selected_step"], 22, 5) == first_best


@pytest.mark.slow
def test_gpt_sources_seed_jobs_resume_and_merge(tmp_path):
    """The seeds run apart from the search give tune_and_test's rows; a resumed run keeps what was done and
    finishes the rest; parts merge into one table."""
    kwargs = dict(smoke=True, device="cpu", trials=1, seeds=2, workers=1, log=lambda line: None)
    first = gpt_sources.run(out=tmp_path / "a", methods=["ERM", "ALSO DA mean"], **kwargs)
    direct = dro_core.tune_and_test(gpt_sources.make_task, dict(smoke=True, device="cpu", backend="auto"),
                                    "ALSO DA mean", 1, 2)
    row = first["results"][1]
    assert [r["test"] for r in row["per_seed"]] == [r["test"] for r in direct["per_seed"]]
    assert row["mean"] == direct["mean"] and row["std"] == direct["std"]
    # a run stopped after ERM's search and seed 0 (its seed 1 not run), and before IW: resume
    stopped = json.loads((tmp_path / "a.json").read_text())
    erm = stopped["results"][0]
    searched = dict(erm, per_seed=erm["per_seed"][:1])
    stopped["results"] = []
    stopped["unfinished"] = {"ERM": {"row": searched, "other_seeds": []}}
    stopped["methods_requested"] = ["ERM", "IW"]
    resumed = gpt_sources.run(out=tmp_path / "b", methods=None, resume=stopped, **kwargs)
    assert [r["method"] for r in resumed["results"]] == ["ERM", "IW"] and resumed["incomplete"] is None
    assert [r["test"] for r in resumed["results"][0]["per_seed"]] == [r["test"] for r in erm["per_seed"]]
    assert resumed["sessions"] and resumed["results"][0]["tuned_hparams"] == erm["tuned_hparams"]
    gpt_sources.run(out=tmp_path / "c", methods=["IW"], **kwargs)
    merged = gpt_sources.merge([tmp_path / "a.json", tmp_path / "c.json"], tmp_path / "m")
    assert [r["method"] for r in merged["results"]] == ["ERM", "IW", "ALSO DA mean"]
    assert merged["best_baseline"] in ("ERM", "IW") and len(merged["parts"]) == 2
    with pytest.raises(SystemExit):
        gpt_sources.merge([tmp_path / "a.json", tmp_path / "a.json"], tmp_path / "m2")


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


# ------------------------------------------------------------------ the colored task and the field's baselines
import tasks_cpu  # noqa: E402


@pytest.mark.parametrize("strength", [0.8, 0.95])
def test_colored_task_groups_and_correlation_as_parameterised(strength):
    task = tasks_cpu.colored(smoke=True, strength=strength)
    g = task.groupings["label x colour"]
    y, a = task.y_tr, task.attribute
    assert torch.equal(g, 2 * y + a)
    # training: the colour equals the label in `strength` of the images (exact per digit, up to rounding)
    assert abs(float((a == y).float().mean()) - strength) < 0.01
    # the image sits in the channel its colour names; the other channel is blank
    X = task.X_tr
    assert torch.all(X[a == 0, 64:] == 0) and torch.all(X[a == 1, :64] == 0)
    assert bool((X[a == 0, :64].abs().sum(1) > 0).all()) and bool((X[a == 1, 64:].abs().sum(1) > 0).all())
    for split in ("val", "test"):  # drawn like the test distribution: every image in both colours
        Xs, ys, gs = task.splits[split]
        counts = torch.bincount(gs, minlength=4)
        assert counts[0] == counts[1] and counts[2] == counts[3] and int(counts.min()) > 150, (split, counts)
        half = len(ys) // 2
        torch.testing.assert_close(Xs[:half, :64], Xs[half:, 64:])
    # validation and test images are different images
    val_rows = {tuple(r) for r in task.splits["val"][0][:, :64].tolist() if any(r)}
    test_rows = {tuple(r) for r in task.splits["test"][0][:, :64].tolist() if any(r)}
    assert len(val_rows & test_rows) <= 2  # (the digits hold a few duplicate images)


def test_spurious_and_long_tailed_validation_drawn_like_test():
    sp = tasks_cpu.spurious(smoke=True)
    counts = torch.bincount(sp.splits["val"][2], minlength=4)
    assert counts[0] == counts[1] and counts[2] == counts[3] and int(counts.min()) > 150
    train_counts = torch.bincount(sp.groupings["label x patch"], minlength=4)
    assert int(train_counts[1]) < 0.15 * int(train_counts[0])  # training keeps the correlation
    lt = tasks_cpu.long_tailed(smoke=True)
    assert lt.describe()["val_per_class"] == [25] * 10
    train = torch.bincount(lt.y_tr, minlength=10).tolist()
    assert train == sorted(train, reverse=True) and train[-1] < 10 < 50 < train[0]
    _, y_demo, _, _ = tasks_cpu.demo_module().long_tailed_raw(0)
    assert train[1:] == torch.bincount(y_demo, minlength=10).tolist()[1:]  # the demo's tail, untouched


def _recorded_groups(method, hp):
    task = tasks_cpu.colored(smoke=True)
    seen = []
    losses = task.losses

    def recording(model, idx):
        seen.append(task.groupings["label x colour"][idx])
        return losses(model, idx)

    task.losses = recording
    dro_core.train_run(task, method, hp, seed=0, evaluate_test=False)
    return torch.bincount(torch.cat(seen), minlength=4).double() / sum(len(s) for s in seen)


def test_upsampling_draws_groups_balanced():
    ids = torch.tensor([0] * 90 + [1] * 7 + [2] * 3 + [3] * 50)
    p = dro_core.group_balanced_probabilities(ids, 5)  # group 4 is empty
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(torch.zeros(5).index_add(0, ids, p)[:4], torch.full((4,), 0.25))
    hp = dict(lr=1e-3, weight_decay=1e-4)
    shares = _recorded_groups("Upsampling", hp)  # 2 epochs of 838 draws
    assert float((shares - 0.25).abs().max()) < 0.05, shares
    erm = _recorded_groups("ERM", hp)
    assert float(erm[1]) < 0.04 and float(erm[2]) < 0.04, erm  # without it the minorities fill ~2.4% each


def test_jtt_upweights_exactly_the_misclassified():
    errors = torch.tensor([True, False, False, True, False])
    w = dro_core.jtt_weights(errors, 20.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[errors], torch.full((2,), 20.0) * w[~errors][0])
    assert torch.all(w[~errors] == w[~errors][0])
    task = tasks_cpu.colored(smoke=True)
    spec = dro_core.method_spec("JTT")
    hp = dict(lr=3e-3, weight_decay=1e-4, jtt_epochs=1, upweight=20.0)
    found = dro_core.jtt_error_set(task, spec, hp, seed=0)
    # the error set is exactly what the first-stage model gets wrong: retrain it and compare
    torch.manual_seed(0)
    model = task.make_model()
    opt = dro_core.make_theta_optimizer(task, spec, list(model.parameters()), hp)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(task.y_tr), generator=gen)
    for b in range(len(task.y_tr) // task.batch):
        idx = order[b * task.batch:(b + 1) * task.batch]
        opt.zero_grad()
        task.losses(model, idx).mean().backward()
        opt.step()
    with torch.no_grad():
        wrong = model(task.X_tr).argmax(1) != task.y_tr
    assert torch.equal(found, wrong) and 0 < int(wrong.sum()) < len(wrong)
    run = dro_core.train_run(task, "JTT", hp, seed=0, evaluate_test=False)
    assert run["jtt_error_set"]["size"] == int(wrong.sum())


def test_groupdro_adjustment_adds_c_over_sqrt_n_to_present_groups():
    train_ids = torch.tensor([0] * 100 + [1] * 4 + [2] * 25 + [3] * 9)
    adj = dro_core.sagawa_adjustment(train_ids, 4, 2.0)
    torch.testing.assert_close(adj, torch.tensor([0.2, 1.0, 0.4, 2.0 / 3.0]))
    losses = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5])
    ids = torch.tensor([0, 0, 1, 2, 2])  # group 3 absent from the batch
    eta = 0.5
    dro = dro_core.GroupDRO(4, eta, torch.device("cpu"), adj)
    loss = dro.loss(losses, ids)
    means = torch.tensor([2.0, 0.5, 1.75, 0.0])
    scores = means + adj * torch.tensor([1.0, 1.0, 1.0, 0.0])
    q = torch.softmax(eta * scores, 0)
    torch.testing.assert_close(dro.q, q)
    torch.testing.assert_close(loss, (q * means).sum())
    plain = dro_core.GroupDRO(4, eta, torch.device("cpu"))
    plain.loss(losses, ids)
    assert float(dro.q[1] / plain.q[1]) > float(dro.q[0] / plain.q[0])  # the small group gains weight


def test_cvar_loss_is_the_mean_of_the_largest_losses():
    losses = torch.tensor([0.1, 4.0, 2.0, 0.5, 3.0, 1.0, 0.2, 0.3, 0.4, 0.6])
    torch.testing.assert_close(dro_core.cvar_loss(losses, 0.2), torch.tensor(3.5))
    torch.testing.assert_close(dro_core.cvar_loss(losses, 0.25), torch.tensor(3.0))  # ceil(2.5) = 3
    torch.testing.assert_close(dro_core.cvar_loss(losses, 1.0), losses.mean())
    torch.testing.assert_close(dro_core.cvar_loss(losses, 0.01), torch.tensor(4.0))
