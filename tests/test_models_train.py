"""calib.models and calib.train on tiny inputs: shapes, normalisation inside the model,
feature extraction, checkpoints without pickles, seeded determinism, augmentation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from calib import models, runtime, train


def _tiny_resnet():
    return models.create_model("resnet10t", num_classes=3, in_chans=1, img_size=16,
                               mean=(0.5,), std=(0.25,))


def test_create_model_families_and_shapes():
    m = _tiny_resnet()
    x = torch.rand(2, 1, 16, 16)
    assert m(x).shape == (2, 3)
    assert m.features(x).ndim == 2
    v = models.create_model("vit_fmnist_d4", num_classes=10, in_chans=1, img_size=28,
                            mean=(0.3,), std=(0.3,))
    assert v(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert models.family_of("vit_base_patch16_224.augreg_in21k") == "vit"
    assert models.family_of("resnet50") == "resnet"


def test_normalisation_lives_inside_the_model():
    m = _tiny_resnet().eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        direct = m.net((x - 0.5) / 0.25)
        assert torch.allclose(m(x), direct)


@pytest.mark.parametrize("arch", ["densenet121", "vgg16"])
def test_unknown_arch_names_allowed(arch):
    with pytest.raises(ValueError, match="allowed"):
        models.create_model(arch, num_classes=3, in_chans=1, img_size=16, mean=(0.5,),
                            std=(0.2,))


def test_save_and_load_trained_roundtrip(tmp_path):
    m = _tiny_resnet()
    spec = {"arch": "resnet10t", "num_classes": 3, "in_chans": 1, "img_size": 16,
            "mean": [0.5], "std": [0.25]}
    models.save_trained(tmp_path / "m", m, spec)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json",
                                                                  "model.safetensors"]
    loaded = models.load_trained(tmp_path / "m")
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="training stage"):
        models.load_trained(tmp_path / "nothing")


def _toy_data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.rand(n, 1, 16, 16, generator=gen) * 0.3
    for c in range(3):  # a bright stripe whose row depends on the class
        x[y == c, :, 4 * c + 2: 4 * c + 4, :] += 0.7
    return TensorDataset(x.clamp(0, 1), y)


def _fit(seed):
    runtime.seed_everything(seed)
    m = _tiny_resnet()
    res = train.fit(m, _toy_data(), _toy_data(48, 1), epochs=2, batch_size=32, lr=0.05,
                    seed=seed, show_progress=False)
    return m, res


def test_fit_learns_and_is_deterministic():
    m1, r1 = _fit(0)
    m2, r2 = _fit(0)
    assert r1.history == r2.history
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert r1.best_epoch in (1, 2)
    assert len(r1.history) == 2 and {"train_loss", "val_accuracy", "lr"} <= set(r1.history[0])


def test_fit_rejects_bad_arguments():
    m = _tiny_resnet()
    with pytest.raises(ValueError, match="epochs"):
        train.fit(m, _toy_data(), _toy_data(), epochs=0, show_progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train.fit(m, _toy_data(), _toy_data(), epochs=1, optimizer="adam", show_progress=False)
    empty = TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="val_data is empty"):
        train.fit(m, _toy_data(), empty, epochs=1, show_progress=False)


def test_predict_logits_restores_mode_and_matches_forward():
    m = _tiny_resnet().train()
    x = torch.rand(10, 1, 16, 16)
    logits = runtime.predict_logits(m, x, batch_size=4)
    assert m.training
    with torch.no_grad():
        assert torch.allclose(logits, m.eval()(x), atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet10t", "vit_fmnist_d4"])
def test_layer_features_equal_forward_and_features_exactly(arch):
    size = 16 if arch == "resnet10t" else 28
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = models.create_model(arch, num_classes=5, in_chans=1, img_size=size, mean=(0.5,),
                                std=(0.25,)).eval()
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_pass = m.layer_features(x, models.FEATURE_LAYERS)
        two = m.layer_features(x, ("penultimate", "logits"))
        assert torch.equal(one_pass["logits"], m(x))
        assert torch.equal(two["logits"], m(x))
        assert torch.equal(one_pass["penultimate"], m.features(x))
        assert torch.equal(two["penultimate"], m.features(x))
    assert one_pass["intermediate"].ndim == 2 and one_pass["intermediate"].shape[0] == 3
    assert set(two) == {"penultimate", "logits"}


def test_extract_features_batches_dtypes_and_modes():
    m = _tiny_resnet().train()
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    small = models.extract_features(m, x, batch_size=3, dtype=torch.float64)
    large = models.extract_features(m, x, layers=("logits", "penultimate"), batch_size=64)
    assert m.training
    assert set(small) == set(models.FEATURE_LAYERS)
    assert all(f.dtype == torch.float64 and f.shape[0] == 7 for f in small.values())
    assert all(f.dtype == torch.float32 for f in large.values())
    torch.testing.assert_close(small["logits"].float(), large["logits"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(large["logits"], m.eval()(x), rtol=1e-5, atol=1e-5)


def test_extract_features_of_other_models_and_bad_arguments():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(5, 1, 4, 4)
    assert models.extract_features(net, x, layers=("logits",))["logits"].shape == (5, 3)
    with pytest.raises(ValueError, match="penultimate"):
        models.extract_features(net, x, layers=("penultimate",))
    with pytest.raises(ValueError, match="intermediate"):
        models.extract_features(net, x, layers=("intermediate",))
    with pytest.raises(ValueError, match="layers"):
        models.extract_features(net, x, layers="logits")
    with pytest.raises(ValueError, match="layers item"):
        models.extract_features(net, x, layers=("pool5",))
    with pytest.raises(ValueError, match="batch_size"):
        models.extract_features(net, x, layers=("logits",), batch_size=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        models.extract_features(net, x * 3, layers=("logits",))


def test_augment_batch_crops_and_flips_per_sample():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = train.augment_batch(x, pad=0, flip=True, generator=gen)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = train.augment_batch(x, pad=1, flip=False, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # Every output pixel is either padding (0) or a pixel of the same image.
    for i in range(2):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}


def test_levelled_off_reads_the_last_epochs():
    from calib.train import levelled_off

    flat = [{"val_loss": v} for v in (1.0, 0.5, 0.41, 0.40, 0.40)]
    falling = [{"val_loss": v} for v in (1.0, 0.8, 0.6, 0.4)]
    assert levelled_off(flat, "val_loss", last=2, rel_tol=0.05)
    assert not levelled_off(falling, "val_loss", last=2, rel_tol=0.05)
    assert not levelled_off(flat[:2], "val_loss", last=2)  # two points show no plateau
    with pytest.raises(ValueError, match="lack 'val_accuracy'"):
        levelled_off(flat, "val_accuracy")
    with pytest.raises(ValueError, match="last"):
        levelled_off(flat, last=0)
