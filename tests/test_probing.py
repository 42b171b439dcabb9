"""Linear probes: the batched ridge equals sklearn's, one forward per image, stores and bad layers."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import Ridge

import vitlens
from analyses import probing
from tests.helpers.tiny import SyntheticImages, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def splits():
    return SyntheticImages(48, seed=1), SyntheticImages(24, seed=2)


def _sklearn_table(train_x, train_y, test_x, test_y, n_classes, exact):
    """Accuracy and mean rank per position, with one sklearn Ridge per position (the original's loop).

    `exact`: lsqr run to convergence (the ridge solution, the default mode's); else at its default tol=1e-4,
    where it stops short of the solution by about that much (the original's numbers, compat mode's).
    """
    targets = -np.ones((len(train_y), n_classes))
    targets[np.arange(len(train_y)), train_y] = 1
    accuracy, mean_rank = [], []
    for pos in range(train_x.shape[1]):
        ridge = Ridge(alpha=1.0, solver="lsqr", tol=1e-12) if exact else Ridge(alpha=1.0, solver="lsqr")
        scores = ridge.fit(train_x[:, pos], targets).predict(test_x[:, pos])
        label_score = scores[np.arange(len(test_y)), test_y][:, None]
        ranks = (scores > label_score).sum(1)
        accuracy.append(np.mean(scores.argmax(1) == test_y))
        mean_rank.append(ranks.mean())
    return np.array(accuracy), np.array(mean_rank)


def _features(model, data, layer, hook="hook_resid_post", batch_size=16):
    """[n pos d] of one layer, from run_with_cache (independent of the probing module).

    Only the probed hook is cached, so attention stays fused, and in the batches of ``probing.run(...,
    batch_size=16)``: these are bitwise the probes' features. That matters for compat: float32 lsqr stopped at
    tol=1e-4 turns the last-bit differences of another path (~1e-7) into score differences of ~1e-3.
    """
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    name = f"blocks.{layer}.{hook}"
    with torch.no_grad():
        parts = [model.run_with_cache(images[start:start + batch_size], names_filter=[name])[1][name]
                 for start in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy(), np.asarray(data.samples.label)


@pytest.mark.parametrize("compat", [False, True])
def test_probes_match_sklearn_and_run_one_forward_per_image(model, splits, compat):
    train, test = splits
    seen = []
    handle = model.vit.patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
    try:
        table = probing.run(model, train, test, compat=compat, batch_size=16)
    finally:
        handle.remove()
    assert sum(seen) == len(train) + len(test)  # the original: one forward per image and token (x17)
    assert list(table.columns[:4]) == ["layer", "token", "accuracy", "mean_rank"]
    for layer in range(model.cfg.n_layers):
        train_x, train_y = _features(model, train, layer)
        test_x, test_y = _features(model, test, layer)
        accuracy, mean_rank = _sklearn_table(train_x, train_y, test_x, test_y, 10, exact=not compat)
        rows = table[table.layer == layer].sort_values("token")
        np.testing.assert_allclose(rows.accuracy, accuracy)
        np.testing.assert_allclose(rows.mean_rank, mean_rank)


@pytest.mark.parametrize("n", [40, 20])  # primal (n > d) and dual (n < d) solves
def test_ridge_fit_is_exact_and_compat_is_sklearns_default_lsqr(n):
    generator = torch.Generator().manual_seed(n)
    X = torch.randn(3, n, 32, generator=generator) * 4 + 1
    y = torch.randint(0, 5, (n,), generator=generator)
    Y = -torch.ones(n, 5)
    Y[torch.arange(n), y] = 1
    exact, exact_bias = probing.ridge_fit(X, Y)  # float32 Cholesky
    lsqr, lsqr_bias = probing.ridge_fit(X, Y, compat=True)
    for pos in range(3):
        converged = Ridge(alpha=1.0, solver="lsqr", tol=1e-12).fit(X[pos].double().numpy(), Y.double().numpy())
        np.testing.assert_allclose(exact[pos].numpy(), converged.coef_.T, atol=1e-5)
        np.testing.assert_allclose(exact_bias[pos].numpy(), converged.intercept_, atol=1e-5)
        default = Ridge(alpha=1.0, solver="lsqr").fit(X[pos].numpy(), Y.numpy())  # the original's call
        np.testing.assert_allclose(lsqr[pos].numpy(), default.coef_.T, rtol=0, atol=1e-7)
        np.testing.assert_allclose(lsqr_bias[pos].numpy(), default.intercept_, rtol=0, atol=1e-7)
    if n == 40:  # at tol=1e-4 lsqr stops visibly short of the ridge solution: why compat calls sklearn
        assert (lsqr - exact).abs().max() > 1e-5


def test_probes_from_stores_and_a_missing_layer(model, splits, tmp_path):
    train, test = splits
    stores = [vitlens.record(model, data, tmp_path / name, hooks="blocks.*.hook_resid_post", dtype="float32",
                             progress=False) for name, data in (("train", train), ("test", test))]
    from_stores = probing.run(model, *stores)
    from_data = probing.run(model, train, test)
    np.testing.assert_allclose(from_stores[["accuracy", "mean_rank"]], from_data[["accuracy", "mean_rank"]])
    with pytest.raises(KeyError, match="blocks.1.hook_mlp_out"):
        probing.run(model, *stores, hook="hook_mlp_out", layers=[1])
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        probing.run(model, train, test, layers=[5])


def test_split_per_class_keeps_the_first_images_of_each_class(splits):
    data = splits[0]
    train, test = probing.split_per_class(data, 2)
    labels = np.asarray(data.samples.label)
    assert sorted(train.rows + test.rows) == list(range(len(data)))
    assert all(np.sum(labels[train.rows] == c) == min(2, np.sum(labels == c)) for c in np.unique(labels))
    assert train[0]["sample_id"] == train.samples.sample_id[0]
    with pytest.raises(ValueError, match="train-per-class"):
        probing.split_per_class(data, 100)


def test_cli_probes_writes_the_table_resumes_and_names_bad_input(tmp_path, capsys):
    from vitlens.cli import main
    from vitlens.data import load_dataset

    store = tmp_path / "s"
    args = ["analyze", "probes", "--store", str(store), "--n-per-class", "2", "--train-per-class", "1",
            "--no-progress"]
    assert main(args) == 0
    assert "probes" in capsys.readouterr().out
    written = pd.read_csv(store / "results" / "probes.csv")
    assert list(written.columns) == ["layer", "token", "accuracy", "mean_rank"] and len(written) == 4 * 37
    shards = sorted(p.stat().st_mtime_ns for p in store.glob("probe-*/shards/*"))
    assert len(shards) >= 2
    assert main(args) == 0  # resumed: both feature stores reused
    assert sorted(p.stat().st_mtime_ns for p in store.glob("probe-*/shards/*")) == shards
    pd.testing.assert_frame_equal(pd.read_csv(store / "results" / "probes.csv"), written)
    model = vitlens.load_model("tiny-scenes")  # the first scene of each class trains, the second tests
    data = load_dataset("scenes", model=model, n_per_class=2, mask_resize="area")
    expected = probing.run(model, *probing.split_per_class(data, 1))
    np.testing.assert_allclose(written[["accuracy", "mean_rank"]], expected[["accuracy", "mean_rank"]])
    for bad, message in ((["--hook", "hook_mlp_out"], "hook_mlp_out"),  # the stores hold the residual stream
                         (["--train-per-class", "2"], "--train-per-class")):
        capsys.readouterr()
        assert main(args + bad) == 1
        err = capsys.readouterr().err
        assert err.startswith("vitlens: error:") and err.count("\n") == 1 and message in err, err


def test_a_store_lacking_a_layer_is_named(model, splits, tmp_path):
    """A store that recorded only block 0: asking for every layer names the missing block 1 and the fix."""
    train, _ = splits
    store = vitlens.record(model, probing.Rows(train, range(4)), tmp_path / "b0", hooks="blocks.0.hook_resid_post", dtype="float32",
                           progress=False)
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_resid_post.*vitlens record"):
        probing.run(model, store, store)
    only_block0 = probing.run(model, store, store, layers=[0])  # what it holds still probes
    assert set(only_block0.layer) == {0}


def test_plot_is_the_table_as_a_layer_by_token_grid():
    table = pd.DataFrame({"layer": np.repeat([0, 1], 3), "token": np.tile([0, 1, 2], 2),
                          "accuracy": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "mean_rank": [6, 5, 4, 3, 2, 1]})
    figure = probing.plot(table)
    np.testing.assert_allclose(figure.data[0].z, [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # rows = layers
    np.testing.assert_allclose(probing.plot(table, "mean_rank").data[0].z, [[6, 5, 4], [3, 2, 1]])
