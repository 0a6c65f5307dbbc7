"""noise_scale.py: the critical batch of a run from its gradient noise scale (McCandlish et al.)."""

import pytest

from conftest import TINY_TRAIN, ok, run_script, stops_with
from noise_scale import noise_scale


def test_the_estimates_invert_the_noise_model():
    """E|G_B|^2 = |G|^2 + S / B at each batch: the two-batch estimates give |G|^2 and S back, and
    B_simple = S / |G|^2."""
    gradient, noise = 0.3, 12.0
    mean = lambda batch: gradient + noise / batch
    assert noise_scale(mean(4), mean(64), 4, 64) == pytest.approx((40.0, 0.3, 12.0))
    assert noise_scale(mean(2), mean(3), 2, 3) == pytest.approx((40.0, 0.3, 12.0))


def test_a_trained_run_gets_its_critical_batch_in_tokens(workdir, monkeypatch):
    out_dir = workdir / 'noise-run'
    ok(run_script('train.py', *TINY_TRAIN, '--max_iters=10', f'--out_dir={out_dir}', cwd=workdir))
    out = ok(run_script('noise_scale.py', f'--ckpt={out_dir}', '--draws=3', '--big_batch=16', cwd=workdir))
    assert 'B_simple = ' in out and '--critical_batch_tokens=' in out
    assert 'ckpt is not set' in stops_with('noise_scale.py', cwd=workdir, monkeypatch=monkeypatch)
    assert 'need 0 < small_batch < big_batch' in stops_with('noise_scale.py', f'--ckpt={out_dir}', '--small_batch=8',
                                                            '--big_batch=8', cwd=workdir, monkeypatch=monkeypatch)
