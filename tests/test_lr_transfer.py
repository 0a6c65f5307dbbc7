"""lr_transfer.py's runner: every run is train.py with the sweep's settings, cached by every
setting that changes its outcome, so an interrupted sweep resumes and a study reuses runs."""
import json

import pytest

import lr_transfer

FIXED = dict(dataset='tiny', base_width=16, n_layer=1, n_head=2, batch_size=4, block_size=16, warmup_iters=1, grad_clip=1.0,
             weight_decay=0.0, eval_iters=2, mup_scale_weight_decay=True, adam_eps=1e-8, mup_hidden_lr_exponent=1.0)


def run(param, width=32, **kw):
    return dict(lr_transfer.setting(param, width, log2_lr=-8, it=3, **kw), seed=1337)


def test_cache_key_ignores_what_sp_ignores(tmp_path):
    runner = lr_transfer.Runner(str(tmp_path / 'runs.json'), 1, 1, 'cpu', FIXED)
    key = lambda r, **change: runner.key(dict(FIXED, device='cpu', **r, **change))
    for change in (dict(base_width=32), dict(mup_hidden_lr_exponent=0.5), dict(mup_scale_weight_decay=False)):
        assert key(run('sp')) == key(run('sp'), **change) # one SP run serves every muP-only variant
        assert key(run('mup')) != key(run('mup'), **change)
    for change in (dict(adam_eps=1e-12), dict(weight_decay=0.1), dict(n_head=1)):
        assert key(run('sp')) != key(run('sp'), **change)
    assert key(run('sp')) != key(run('sp', init_std=0.04)) != key(run('sp', width=64))


def test_runs_train_py_and_resumes_from_the_cache(tmp_path, monkeypatch, workdir):
    path = tmp_path / 'runs.json'
    runner = lr_transfer.Runner(str(path), 2, 1, 'cpu', FIXED, cwd=workdir)
    runs = [run('mup'), run('sp')]
    records = runner.run_all(runs)
    for record in records:
        assert 0 < record['val_loss'] < 5 and record['train_loss'] > 0 # train.py ran to the end
    assert len(json.loads(path.read_text())) == 2
    # a new runner on the same file runs nothing: every result comes from the cache
    resumed = lr_transfer.Runner(str(path), 2, 1, 'cpu', FIXED)
    monkeypatch.setattr(resumed, 'train', lambda run: pytest.fail(f"re-ran a cached run: {run}"))
    assert resumed.run_all(runs) == records
    # a muP-only change reuses the SP run and trains the muP one again
    changed = lr_transfer.Runner(str(path), 2, 1, 'cpu', dict(FIXED, mup_hidden_lr_exponent=0.5))
    trained = []
    monkeypatch.setattr(changed, 'train', lambda run: trained.append(run['param']) or dict(val_loss=1.0))
    changed.run_all(runs)
    assert trained == ['mup']
