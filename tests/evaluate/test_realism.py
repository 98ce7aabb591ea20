"""Realism: the classifier two-sample test, FID/KID with a given extractor, memorisation, the command."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from histosynth.cli import main
from histosynth.errors import ConfigError, DataError
from histosynth.evaluate.realism import (
    classifier_two_sample_test,
    colour_texture_features,
    evaluate_realism,
    frechet_and_kernel_distance,
    load_feature_extractor,
    memorisation_check,
    thumbnail_features,
)
from histosynth.io import write_png_atomic


def tissue(toy, n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [toy.toy_sample(size, rng)[0] for _ in range(n)]


def noise(n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_real_against_real_is_indistinguishable(toy):
    result = classifier_two_sample_test(colour_texture_features(tissue(toy, 60, 1)),
                                        colour_texture_features(tissue(toy, 60, 2)), bootstrap=300)
    assert 0.35 < result.auc < 0.65
    assert result.ci_low < 0.5 < result.ci_high
    assert result.verdict().startswith("indistinguishable")


def test_real_against_noise_is_told_apart(toy):
    result = classifier_two_sample_test(colour_texture_features(tissue(toy, 30, 1)),
                                        colour_texture_features(noise(30, 2)), bootstrap=300)
    assert result.auc >= 0.99 and result.ci_low >= 0.95
    assert result.verdict().startswith("distinguishable")


def test_auc_is_sklearns_out_of_fold_auc(toy):
    real = colour_texture_features(tissue(toy, 20, 1))
    synthetic = colour_texture_features(tissue(toy, 20, 3)) * 1.05
    result = classifier_two_sample_test(real, synthetic, folds=4, seed=9, bootstrap=200)
    features, labels = np.vstack([real, synthetic]), np.r_[np.zeros(20), np.ones(20)]
    cv = StratifiedKFold(n_splits=4, shuffle=True, random_state=9)
    scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), features, labels,
                               cv=cv, method="predict_proba")[:, 1]
    assert result.auc == pytest.approx(roc_auc_score(labels, scores))
    assert len(result.fold_aucs) == 4
    assert result.ci_low <= result.auc <= result.ci_high
    again = classifier_two_sample_test(real, synthetic, folds=4, seed=9, bootstrap=200)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)


def test_two_sample_test_needs_enough_images():
    with pytest.raises(DataError, match="needs at least 5 images per set; the smaller has 3"):
        classifier_two_sample_test(np.zeros((3, 2)), np.ones((10, 2)))


def test_fid_matches_the_closed_form():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    fake = rng.normal(loc=0.5, scale=1.3, size=(150, 4))
    result = frechet_and_kernel_distance(real, fake, kid_subsets=5, kid_subset_size=100)
    mu1, mu2 = real.mean(0), fake.mean(0)
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-4)
    assert result["kid_subset_size"] == 100
    assert abs(frechet_and_kernel_distance(real, real, kid_subsets=2)["fid"]) < 1e-6


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(60, 3)), rng.normal(loc=0.3, size=(60, 3))
    result = frechet_and_kernel_distance(real, fake, kid_subsets=1, kid_subset_size=60)  # whole sets

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    kxx, kyy, kxy = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    n = len(real)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert result["kid_mean"] == pytest.approx(expected, rel=1e-6)


class MeanColour(nn.Module):
    """A stand-in for a user's feature extractor: mean and spread of each channel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_feature_extractor_is_given_never_downloaded(tmp_path):
    with pytest.raises(ConfigError, match="need a feature extractor.*never downloads"):
        load_feature_extractor(None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_feature_extractor(tmp_path / "inception.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="cannot be loaded as a feature extractor"):
        load_feature_extractor(tmp_path / "junk.pt2")
    example = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch, side = torch.export.Dim("batch"), torch.export.Dim("side")
    program = torch.export.export(MeanColour(), (example,), dynamic_shapes=({0: batch, 2: side, 3: side},))
    torch.export.save(program, str(tmp_path / "mean.pt2"))
    loaded = load_feature_extractor(tmp_path / "mean.pt2")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images), MeanColour()(images))


def test_memorisation_flags_copies_not_fresh_samples(toy):
    training = tissue(toy, 40, 1)
    real = tissue(toy, 20, 2)
    copies = [np.clip(img.astype(int) + 1, 0, 255).astype(np.uint8) for img in training[:20]]
    copied = memorisation_check(thumbnail_features(training), thumbnail_features(copies), thumbnail_features(real))
    assert copied.share_closer == 1.0
    np.testing.assert_array_equal(copied.nearest_training, np.arange(20))
    fresh = memorisation_check(thumbnail_features(training), thumbnail_features(tissue(toy, 20, 3)),
                               thumbnail_features(real))
    assert fresh.share_closer <= 0.25
    assert 0.7 < fresh.summary()["median ratio (synthetic / real)"] < 1.4


def test_evaluate_realism_with_an_extractor(toy):
    result = evaluate_realism(tissue(toy, 20, 1), noise(20, 2), training=tissue(toy, 20, 3),
                              extractor=MeanColour(), bootstrap=100)
    assert result.two_sample.auc > 0.95 and result.two_sample_extractor.auc > 0.95
    assert result.distances["fid"] > 0.1
    assert result.memorisation_space == "extractor features"
    assert result.notes == []


def test_realism_command(toy, tmp_path, capsys):
    folders = {}
    for name, seed in (("real", 1), ("synthetic", 2), ("train", 3)):
        images = tissue(toy, 12, seed)
        folders[name] = tmp_path / name
        for index, image in enumerate(images):
            write_png_atomic(folders[name] / f"{index:03d}.png", image)
    out = tmp_path / "report"
    assert main(["evaluate", "realism", "--real", str(folders["real"]), "--synthetic", str(folders["synthetic"]),
                 "--train", str(folders["train"]), "--out", str(out), "--folds", "3", "--bootstrap", "100"]) == 0
    assert "two-sample ROC AUC" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "## Memorisation" in report and "FID/KID not computed" in report and "never downloads" in report
    assert (out / "roc.png").is_file() and (out / "two_sample.csv").is_file() and (out / "memorisation.png").is_file()
    write_png_atomic(folders["synthetic"] / "big.png", tissue(toy, 1, 4, size=64)[0])
    assert main(["evaluate", "realism", "--real", str(folders["real"]), "--synthetic", str(folders["synthetic"]),
                 "--out", str(out)]) == 2
    assert "mixes image sizes: 48x48 (12), 64x64 (1)" in capsys.readouterr().err
    assert main(["evaluate", "realism", "--real", str(folders["real"]), "--synthetic", str(folders["train"]),
                 "--n", "20", "--out", str(out)]) == 2
    assert "holds 12 images but 20 were asked for" in capsys.readouterr().err


def test_realism_command_reads_a_generation_jobs_numbered_folders(toy, tmp_path, capsys):
    """`generate` writes its images 1000 to a numbered folder (00000/, 00001/): the job folder is the synthetic set."""
    from histosynth.evaluate.images import image_paths

    real, job = tmp_path / "real", tmp_path / "job"
    for index, image in enumerate(tissue(toy, 12, 1)):
        write_png_atomic(real / f"{index:03d}.png", image)
    for index, image in enumerate(tissue(toy, 12, 2)):
        write_png_atomic(job / f"{index // 8:05d}" / f"{index:05d}.png", image)
    (job / "job.json").write_text("{}")
    assert [p.relative_to(job).as_posix() for p in image_paths(job)][7:9] == ["00000/00007.png", "00001/00008.png"]
    assert len(image_paths(job)) == 12
    assert main(["evaluate", "realism", "--real", str(real), "--synthetic", str(job), "--out", str(tmp_path / "r"),
                 "--folds", "3", "--bootstrap", "100"]) == 0
    assert "two-sample ROC AUC" in capsys.readouterr().out
