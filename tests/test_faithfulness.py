"""Faithfulness curves: batched curves equal a plain per-step loop, Quantus PixelFlipping agreement, the oracle
map beats the random map on the bundled scenes, bad input."""
import numpy as np
import pytest
import torch

from analyses import faithfulness as fa
from analyses import localisation as lo
from tests.helpers.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    maps = torch.rand(3, 4, 4, generator=generator)
    return model, images, maps, torch.tensor([1, 4, 7])


def plain_curve(model, images, maps, target, steps, insert, baseline):
    """One forward per image and step, written out: patches of 8 px, most relevant first."""
    curves = []
    for x, m, t in zip(images, maps, target):
        order = sorted(range(16), key=lambda i: -float(m.flatten()[i]))
        points = []
        for k in range(steps + 1):
            count = round(k * 16 / steps)
            chosen = order[:count]
            out = x.clone() if not insert else torch.full_like(x, baseline)
            for i in range(16):
                r, c = divmod(i, 4)
                patch = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
                if insert and i in chosen:
                    out[patch] = x[patch]
                if not insert and i in chosen:
                    out[patch] = baseline
            with torch.no_grad():
                points.append(model(out[None]).softmax(-1)[0, t].item())
        curves.append(points)
    return torch.tensor(curves)


@pytest.mark.parametrize("insert", [False, True])
def test_batched_curves_equal_a_per_step_loop(tiny, insert):
    model, images, maps, target = tiny
    fn = fa.insertion if insert else fa.deletion
    curves, area = fn(model, images, maps, target, steps=8, baseline=0.5, batch_size=5)
    expected = plain_curve(model, images, maps, target, 8, insert, 0.5)
    torch.testing.assert_close(curves, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(area, torch.from_numpy(np.trapezoid(expected.numpy(), dx=1 / 8, axis=-1)).float())
    both = fa.deletion_insertion(model, images, maps, target, steps=8, baseline=0.5)
    torch.testing.assert_close(both["insertion" if insert else "deletion"].curves, curves, atol=1e-6, rtol=0)


def test_pixel_flipping_agrees_with_quantus(tiny):
    quantus = pytest.importorskip("quantus")
    model, images, _, target = tiny
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    steps = 16
    ours = fa.deletion(model, images, maps, target, steps=steps, level="pixel", baseline="zero")
    # Quantus wants features_in_step to divide H * W but flips channel values (the map broadcast over the 3
    # channels): 64 of them a step, so every third of its steps ends on whole pixels, 64 more of them each time
    metric = quantus.PixelFlipping(features_in_step=32 * 32 // steps, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=images.numpy(), y_batch=target.numpy(),
                               a_batch=maps[:, None].numpy(), device="cpu", softmax=True))[:, 2::3]
    assert theirs.shape == (3, steps)
    np.testing.assert_allclose(ours.curves[:, 1:].numpy(), theirs, atol=1e-6)
    # its AUC (utils.calculate_auc: np.trapz, gone in numpy 2) is unit-spaced trapezoid = compat=True
    np.testing.assert_allclose(fa.auc(ours.curves[:, 1:], compat=True).numpy(), np.trapezoid(theirs, dx=1, axis=-1),
                               atol=1e-5)


def test_endpoints_lerf_aopc_and_outputs(tiny):
    model, images, maps, target = tiny
    with torch.no_grad():
        logits = model(images)
        zero = model(torch.zeros_like(images))
    deleted = fa.deletion(model, images, maps, target, steps=4, output="logit")
    torch.testing.assert_close(deleted.curves[:, 0], logits[torch.arange(3), target])
    torch.testing.assert_close(deleted.curves[:, -1], zero[torch.arange(3), target])
    ce = fa.deletion(model, images, maps, target, steps=4, output="cross_entropy").curves
    p = fa.deletion(model, images, maps, target, steps=4).curves
    torch.testing.assert_close(ce, -p.log())
    lerf = fa.deletion(model, images, maps, target, steps=16, order="lerf").curves
    morf_of_negated = fa.deletion(model, images, -maps, target, steps=16).curves
    torch.testing.assert_close(lerf, morf_of_negated)
    drops = fa.aopc(model, images, maps, target, regions=5, baseline="zero")
    torch.testing.assert_close(drops.curves, p[:, :1] - fa.deletion(model, images, maps, target, steps=16).curves[:, :6])
    torch.testing.assert_close(drops.auc, drops.curves.mean(-1))


def test_noisy_linear_imputation_solves_the_neighbour_equations():
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2)).double()
    removed = torch.zeros(2, 6, 6, dtype=torch.bool)
    removed[0, 2:4, 1:4] = True
    removed[1, 0, 0] = True
    out = fa.noisy_linear_imputation(images, removed, noise=0.0)
    assert torch.equal(out[~removed[:, None].expand_as(out)], images[~removed[:, None].expand_as(out)])
    for b, i, j in removed.nonzero().tolist():  # each imputed pixel is the weighted mean of its neighbours
        total, weight = 0, 0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and 0 <= i + di < 6 and 0 <= j + dj < 6:
                    w = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                    total, weight = total + w * out[b, :, i + di, j + dj], weight + w
        torch.testing.assert_close(out[b, :, i, j], total / weight)


@pytest.fixture(scope="module")
def scenes():
    import vitlens
    from vitlens.data import load_dataset

    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, mask_resize="area")
    items = [data[i] for i in range(0, len(data), len(data) // 24)][:24]
    return (model, torch.stack([i["image"] for i in items]), torch.stack([i["token_mask"] for i in items]),
            torch.tensor([i["label"] for i in items]))


def test_oracle_beats_random_on_scenes(scenes):
    model, images, masks, labels = scenes
    oracle = fa.deletion_insertion(model, images, masks, labels)
    chance = fa.deletion_insertion(model, images, lo.random_maps(masks.shape), labels)
    assert oracle["deletion"].auc.mean() < chance["deletion"].auc.mean() - 0.1
    assert oracle["insertion"].auc.mean() > chance["insertion"].auc.mean() + 0.1
    assert fa.aopc(model, images, masks, labels).auc.mean() > fa.aopc(model, images, lo.random_maps(masks.shape),
                                                                    labels).auc.mean()


def test_token_removal_oracle_beats_random(scenes):
    model, images, masks, labels = scenes
    oracle_curve, oracle_auc = fa.token_removal(model, images, masks, labels)
    chance_curve, chance_auc = fa.token_removal(model, images, lo.random_maps(masks.shape), labels)
    assert oracle_curve.shape == (35,) and oracle_auc > chance_auc
    _, study = fa.token_removal(model, images, masks, labels, compat=True)
    assert study == pytest.approx(float(oracle_curve.sum() / (oracle_curve.max() * 36)))


def test_token_removal_auc_per_image(scenes):
    from analyses import saliency

    model, images, masks, labels = scenes
    images, masks, labels = images[:6], masks[:6], labels[:6]
    per_image = fa.token_removal_auc(model, images, masks, labels)
    # each image's AUC: the trapezoid over n / 36 of its own 0/1 keep-top-n curve, divided by the span
    for b in range(len(images)):
        curve = saliency.token_removal_curve(model, images[b:b + 1], labels[b:b + 1], masks[b:b + 1]).numpy()
        assert set(np.unique(curve)) <= {0.0, 1.0}
        x = np.arange(1, 36) / 36
        expected = np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0])
        assert per_image[b].item() == pytest.approx(expected, abs=1e-6)
    # linear: the mean over images is the batch curve's plain AUC
    assert per_image.mean().item() == pytest.approx(fa.token_removal(model, images, masks, labels)[1], abs=1e-6)
    # a pixel map is averaged over each patch first
    pixels = masks.repeat_interleave(8, -2).repeat_interleave(8, -1)
    torch.testing.assert_close(fa.token_removal_auc(model, images, pixels, labels), per_image)


def test_token_removal_auc_batches_images_with_the_per_image_values(scenes, monkeypatch):
    from analyses import saliency

    model, images, masks, labels = scenes
    images, maps, labels = images[:6], masks[:6] + torch.rand(6, 6, 6, generator=torch.Generator().manual_seed(0)), \
        labels[:6]
    for order in ("negative", "positive"):  # one image at a time, as the AUCs were computed before batching
        alone = torch.tensor([fa.token_removal(model, images[i:i + 1], maps[i:i + 1], labels[i:i + 1],
                                               order=order)[1] for i in range(6)])
        assert 0 < alone.mean() < 1 and len(alone.unique()) > 1
        forward_kept, calls = saliency.forward_kept, []
        monkeypatch.setattr(saliency, "forward_kept", lambda m, x, keep: calls.append(len(x)) or forward_kept(m, x, keep))
        assert torch.equal(fa.token_removal_auc(model, images, maps, labels, order=order), alone)
        assert calls == [6 * 35]  # every image's 35 kept sets in one call, not one call per image
        calls.clear()
        assert torch.equal(fa.token_removal_auc(model, images, maps, labels, order=order, batch_size=40), alone)
        assert max(calls) <= 40 and sum(calls) == 6 * 35  # up to batch_size rows per call
        monkeypatch.undo()


def test_bad_input(tiny):
    model, images, maps, target = tiny
    with pytest.raises(ValueError, match="token grid \\(4, 4\\)"):
        fa.deletion(model, images, torch.rand(3, 5, 5), target)
    with pytest.raises(ValueError, match="baseline"):
        fa.deletion(model, images, maps, target, baseline="grey")
    with pytest.raises(ValueError, match="order"):
        fa.insertion(model, images, maps, target, order="best")
    with pytest.raises(ValueError, match="output"):
        fa.deletion(model, images, maps, target, output="loss")
    with pytest.raises(ValueError, match="steps"):
        fa.deletion(model, images, maps, target, steps=0)


@pytest.fixture(scope="module")
def map_store(tmp_path_factory):
    import vitlens
    from analyses import explain
    from vitlens.data import load_dataset

    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, n_per_class=1)
    path = tmp_path_factory.mktemp("maps") / "store"
    explain.run(model, data, ["rollout"], path, progress=False)
    return model, data, path


def test_evaluate_store_tidy_table_and_resume(map_store):
    model, data, path = map_store
    metrics = ["deletion", "insertion", "relevance_mass", "miou"]
    table = fa.evaluate(path, data, metrics=metrics, model=model, progress=False)
    assert set(table.method) == {"rollout", "random", "centre", "oracle"}
    assert (path / "results" / "evaluate.csv").exists() and (path / "results" / "evaluate_summary.csv").exists()
    # the oracle's relevance mass at the pixel level is 1 for every image; its deletion beats the random map's
    oracle = table[(table.method == "oracle") & (table.metric == "relevance_mass") & (table.level == "pixel")]
    assert np.allclose(oracle.value, 1.0)
    mean = table.groupby(["method", "metric"]).value.mean()
    assert mean["oracle", "deletion"] < mean["random", "deletion"]
    # the stored rollout scores equal the tensor functions on the stored maps
    from vitlens.store import ActivationStore

    with ActivationStore(path) as store:
        maps = torch.from_numpy(store["map.rollout"][:])
    items = [data[i] for i in range(len(data))]
    images, labels = torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items])
    masks = lo.pixel_masks(data, range(len(data)))
    rollout = table[table.method == "rollout"].set_index(["metric", "level", "index"]).value
    expected = lo.relevance_mass(maps, masks, level="patch")
    np.testing.assert_allclose(rollout.loc["relevance_mass", "patch"].sort_index().values, expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(rollout.loc["deletion", "patch"].sort_index().values,
                               fa.deletion(model, images, maps, labels).auc.numpy(), atol=1e-5)
    summary = fa.summarise(table)
    row = summary[(summary.group == "all") & (summary.method == "rollout") & (summary.metric == "deletion")].iloc[0]
    assert row.ci_low <= row["mean"] <= row.ci_high and row.n == len(data)
    assert set(summary.group) == {"all", "class", "mask_size"}
    again = fa.evaluate(path, data, metrics=metrics, model=model, progress=False)  # resumes: nothing recomputed
    assert again.equals(table)
    heatmap = fa.plot(path).data[0]  # the method x metric table: the summary's means
    columns, rows = list(heatmap.x), list(heatmap.y)
    assert heatmap.z[rows.index("rollout")][columns.index("deletion (patch)")] == pytest.approx(
        table[(table.method == "rollout") & (table.metric == "deletion")].value.mean())
    curves = fa.plot(path, kind="curves")  # rollout's mean deletion curve over the images
    line = next(trace for trace in curves.data if trace.name == "rollout")
    np.testing.assert_allclose(line.y, fa.deletion(model, images, maps, labels).curves.mean(0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        fa.plot(path, kind="bars")


def test_interrupted_evaluation_resumes_to_the_same_table(map_store, tmp_path, monkeypatch):
    import shutil

    from analyses import benchmark
    from vitlens.store import ActivationStore

    model, data, path = map_store
    metrics = ["token_removal", "relevance_mass"]
    copies = {}
    for name in ("whole", "interrupted"):
        copies[name] = tmp_path / name
        shutil.copytree(path, copies[name], ignore=shutil.ignore_patterns("results"))
    whole = fa.evaluate(copies["whole"], data, metrics=metrics, model=model, batch_size=4, progress=False)
    # token_removal is each image's plain AUC of its keep-top-n curve
    with ActivationStore(path) as store:
        maps = torch.from_numpy(store["map.rollout"][:])
    items = [data[i] for i in range(len(data))]
    images, labels = torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items])
    stored = whole[(whole.method == "rollout") & (whole.metric == "token_removal")].sort_values("index").value
    np.testing.assert_allclose(stored.values, fa.token_removal_auc(model, images, maps, labels).numpy(), atol=1e-6)

    compute, calls = benchmark.Scores.compute, []

    def stop_at_the_second_batch(self, *args, **kwargs):  # call 1: the recorder's probe of the output shape
        calls.append(self.method)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(benchmark.Scores, "compute", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        fa.evaluate(copies["interrupted"], data, metrics=metrics, model=model, batch_size=4, progress=False)
    monkeypatch.setattr(benchmark.Scores, "compute", lambda self, *args, **kwargs: calls.append(self.method)
                        or compute(self, *args, **kwargs))
    calls.clear()
    again = fa.evaluate(copies["interrupted"], data, metrics=metrics, model=model, batch_size=4, progress=False)
    # rollout's first batch was kept: 10 images are 3 batches of 4 (and a probe in a new store); 2 were left
    assert calls == ["rollout"] * 2 + ["random"] * 4 + ["centre"] * 4 + ["oracle"] * 4
    assert again.equals(whole)
    assert ((copies["interrupted"] / "results" / "evaluate.csv").read_text()
            == (copies["whole"] / "results" / "evaluate.csv").read_text())


def test_scores_open_the_maps_store_once_per_method_and_close_it(map_store, tmp_path, monkeypatch):
    import shutil

    from analyses import benchmark
    from vitlens import store as store_module

    model, data, path = map_store
    opened = []

    class Counted(store_module.ActivationStore):
        def __init__(self, where, *args, **kwargs):
            super().__init__(where, *args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(store_module, "ActivationStore", Counted)
    with store_module.ActivationStore(path) as plain:
        stored = torch.from_numpy(plain["map.rollout"][:])
    opened.clear()
    scores = benchmark.Scores("rollout", ("relevance_mass",), path, data)
    for rows in ([0, 1, 2], [3, 5, 4], [9], [6, 8]):  # batches as the recorder gives them, one store read each
        images = torch.stack([data[i]["image"] for i in rows])
        assert torch.equal(scores.maps(model, images, torch.tensor(rows), None), stored[rows])
    assert len(opened) == 1 and not opened[0]._closed
    scores.close()
    assert opened[0]._closed and scores._maps_store is None
    assert scores.to_dict() == {"class": "Scores", "method": "rollout", "metrics": ["relevance_mass"], "steps": 20,
                                "baseline": "zero"}  # the scores store's identity is unchanged
    copy = tmp_path / "maps"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("results"))
    opened.clear()
    fa.evaluate(copy, data, metrics=["relevance_mass"], model=model, batch_size=3, progress=False)  # 4 batches
    maps_opens = [s for s in opened if s.path == copy]
    assert len(maps_opens) == 2  # evaluate's check of the store, then rollout's scores; the baselines read none
    assert all(s._closed for s in maps_opens)


def test_evaluate_bad_input(map_store, tmp_path):
    model, data, path = map_store
    with pytest.raises(ValueError, match="unknown metric"):
        fa.evaluate(path, data, metrics=["deletion", "accuracy"], model=model)
    with pytest.raises(KeyError, match="vit_cx"):
        fa.evaluate(path, data, methods=["vit_cx"], model=model)
    with pytest.raises(ValueError, match="no segmentation masks"):
        fa.evaluate(path, type("NoMasks", (), {"samples": data.samples.drop(columns="mask_path")})(), model=model)
    import vitlens

    empty = vitlens.record(model, data, tmp_path / "plain", hooks=["hook_logits"], progress=False)
    empty.close()
    with pytest.raises(ValueError, match="no explanation maps"):
        fa.evaluate(tmp_path / "plain", data, model=model)


def test_baselines_equal_plain_definitions(tiny):
    from scipy.ndimage import gaussian_filter

    model, images, _, _ = tiny
    images = images.double()
    # Petsiuk's blur: a Gaussian of sigma 5 cut at 5 px (kernel 11), torch's 'reflect' padding = scipy's 'mirror'
    blurred = gaussian_filter(images.numpy(), sigma=(0, 0, 5, 5), truncate=1.0, mode="mirror")
    np.testing.assert_allclose(fa.baseline_images(images, "blur").numpy(), blurred, atol=1e-10)
    mean = fa.baseline_images(images, "mean")
    torch.testing.assert_close(mean[1, 2, 7, 3], images[1, 2].mean())
    config = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5)}
    black = fa.baseline_images(images, "black", data_config=config)
    torch.testing.assert_close(black[2, :, 0, 0], torch.tensor([-2.5, -1.6, -0.6], dtype=torch.double))
    noise = fa.baseline_images(images, "uniform")  # DiffMask: torch.manual_seed(123), uniform in [-1, 1]
    with torch.random.fork_rng():
        torch.manual_seed(123)
        expected = torch.rand(3, 32, 32) * 2 - 1
    torch.testing.assert_close(noise, expected.double().expand_as(images))
    with pytest.raises(ValueError, match="data_config"):
        fa.baseline_images(images, "black")


def plain_pixel_curve(model, images, maps, target, counts, order, fill, output="probability"):
    """One forward per image and count: the map upsampled bilinearly, `count` pixels removed (most or least
    relevant first, ties in raster order), filled by fill(image, removed [H W] bool)."""
    curves = []
    for x, m, t in zip(images, maps, target):
        values = torch.nn.functional.interpolate(m[None, None], size=x.shape[-2:], mode="bilinear")[0, 0].flatten()
        sign = -1 if order == "morf" else 1
        ranked = sorted(range(len(values)), key=lambda i: sign * float(values[i]))
        points = []
        for count in counts:
            removed = torch.zeros(len(values), dtype=torch.bool)
            removed[ranked[:count]] = True
            with torch.no_grad():
                logits = model(fill(x, removed.view(x.shape[-2:]))[None])[0]
            points.append(float(logits.argmax() == t) if output == "accuracy" else logits.softmax(-1)[t].item())
        curves.append(points)
    return torch.tensor(curves)


def test_positive_negative_equals_a_per_step_loop(tiny):
    model, images, maps, _ = tiny
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    config = model.data_config
    black = (-torch.tensor(config["mean"]) / torch.tensor(config["std"]))[:, None]

    def zero_pixels(x, removed):  # Chefer: the pixel set to 0 before normalisation
        out = x.clone()
        out[:, removed] = black.expand(3, int(removed.sum()))
        return out

    counts = [round(k * 1024 / 10) for k in range(10)]  # 0, 10, ..., 90%
    for output in ("probability", "accuracy"):
        ours = fa.positive_negative(model, images, maps, predicted, output=output, batch_size=7)
        for name, order in (("positive", "morf"), ("negative", "lerf")):
            expected = plain_pixel_curve(model, images, maps, predicted, counts, order, zero_pixels, output)
            torch.testing.assert_close(ours[name].curves, expected, atol=1e-5, rtol=0)
            np.testing.assert_allclose(ours[name].auc.numpy(), np.trapezoid(expected.numpy(), np.arange(10) / 10),
                                       atol=1e-5)
    assert (ours["positive"].curves[:, 0] == 1).all()  # the unperturbed image is classified as predicted


def test_road_equals_a_per_step_loop(tiny):
    model, images, maps, target = tiny
    percentages = (10, 35, 90)

    def impute(x, removed):  # noise 0: the neighbour equations alone (checked above), one image at a time
        return fa.noisy_linear_imputation(x[None], removed[None], noise=0.0)[0]

    counts = [round(p / 100 * 1024) for p in percentages]
    for order in ("morf", "lerf"):
        ours = fa.road(model, images, maps, target, percentages=percentages, order=order, output="probability",
                       noise=0.0, batch_size=4)
        expected = plain_pixel_curve(model, images, maps, target, counts, order, impute)
        torch.testing.assert_close(ours.curves, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ours.auc.numpy(), np.trapezoid(expected.numpy(), np.array(percentages) / 100),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="percentages"):
        fa.road(model, images, maps, target, percentages=(0, 50))


def test_compat_reproduces_the_diffmask_notebook_curves(tiny):
    """DiffMask's quantitative_comparison: keep the bottom ("positive") or top ("negative") keep_k pixels for
    keep_k = N, N - N/28, ..., 0, the rest uniform noise in [-1, 1] re-seeded with 123; "acc" = the mean softmax
    probability of the predicted class, "KLD" = the mean of its -log; AUC np.trapz with unit spacing."""
    model, images, _, _ = tiny
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    n, steps = 32 * 32, 16
    for name, order in (("positive", "morf"), ("negative", "lerf")):
        probabilities = []
        for x, a, c in zip(images, maps, predicted):
            ranked = a.flatten().argsort()  # ascending
            curve = []
            for keep_k in range(n, -1, -n // steps):
                kept = ranked[:keep_k] if name == "positive" else ranked[n - keep_k:]
                with torch.random.fork_rng():
                    torch.manual_seed(123)
                    noisy = torch.rand_like(x) * 2 - 1
                keep = torch.zeros(n, dtype=torch.bool)
                keep[kept] = True
                with torch.no_grad():
                    curve.append(model(torch.where(keep.view(32, 32), x, noisy)[None]).softmax(-1)[0, c].item())
            probabilities.append(curve)
        probabilities = np.array(probabilities)
        acc, kld = probabilities.mean(0), (-np.log(probabilities)).mean(0)
        options = dict(steps=steps, level="pixel", baseline="uniform", order=order, compat=True)
        ours_acc = fa.deletion(model, images, maps, predicted, output="probability", **options)
        ours_kld = fa.deletion(model, images, maps, predicted, output="cross_entropy", **options)
        np.testing.assert_allclose(ours_acc.curves.mean(0).numpy(), acc, atol=1e-5)
        np.testing.assert_allclose(ours_kld.curves.mean(0).numpy(), kld, atol=1e-4)
        assert ours_acc.auc.mean().item() == pytest.approx(np.trapezoid(acc), abs=1e-4)
        assert ours_kld.auc.mean().item() == pytest.approx(np.trapezoid(kld), abs=1e-3)
        # the default AUC is the same trapezoid over the removed fraction in [0, 1]
        assert fa.deletion(model, images, maps, predicted, output="probability", **{**options, "compat": False}
                           ).auc.mean().item() == pytest.approx(np.trapezoid(acc) / steps, abs=1e-5)


def test_cli_evaluate_prints_the_table_resumes_and_errors_in_one_line(map_store, tmp_path, capsys):
    import shutil

    import pandas as pd

    from vitlens.cli import main

    _, _, path = map_store
    store = tmp_path / "cli"
    shutil.copytree(path, store, ignore=shutil.ignore_patterns("results"))
    args = ["evaluate", str(store), "--data", "scenes", "--n-per-class", "1", "--metrics",
            "relevance_mass,pointing_game", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("rollout", "random", "centre", "oracle", "relevance_mass"))
    table = pd.read_csv(store / "results" / "evaluate.csv")
    summary = pd.read_csv(store / "results" / "evaluate_summary.csv")
    oracle = summary[(summary.group == "all") & (summary.method == "oracle")]  # both metrics, both levels
    assert len(oracle) == 4 and np.allclose(oracle[["mean", "ci_low", "ci_high"]].values, 1.0)
    assert "1.000 [1.000, 1.000]" in out
    assert set(summary.group) == {"all", "class", "mask_size"} and (summary.nan == 0).all()
    assert main(args) == 0  # resumed: the same table
    pd.testing.assert_frame_equal(pd.read_csv(store / "results" / "evaluate.csv"), table)
    capsys.readouterr()
    for bad, words in ((["--metrics", "accuracy"], "--metrics"), (["--methods", "vit_cx"], "--methods")):
        assert main(args[:4] + bad + ["--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vitlens: error:") and err.count("\n") == 1 and words in err, err
