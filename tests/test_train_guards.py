"""Session 32's audit of the trainer's, the report writer's and the command line's guards. Each test failed on the code
before its fix (the failure it saw is in the test's docstring)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hiertcn_fast import cli
from hiertcn_fast.train import TrainConfig, Trainer, build_model, sampled_softmax_loss
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

TINY = dict(embedding_dim=16, state_hidden=8, tcn_channels=(16, 16), kernel_size=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("guards"), num_events=2000, num_items=100)


def config(**kwargs):
    values = dict(epochs=2, lanes=8, sessions_per_batch=4, learning_rate=1e-2, seed=7, num_producers=1)
    values.update(kwargs)
    return TrainConfig(**values)


def model(cache):
    return build_model("hiertcn", cache.num_items, seed=1, **TINY)


# ---- checkpoint paths refused before any work ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["under a file", "two folders under a file"])
def test_a_checkpoint_whose_folder_cannot_be_made_is_refused_before_training(cache, tmp_path, where):
    """Trainer() took it; the first save (after checkpoint_every steps, or the whole run) failed with
    FileExistsError naming the parent, and the run's work was lost."""
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    path = a_file / "ckpt.pt" if where == "under a file" else a_file / "x" / "y" / "ckpt.pt"
    for every in (0, 2):
        with pytest.raises(ValueError, match=f"checkpoint_path '{path}': '{a_file}' is not a folder"):
            Trainer(model(cache), cache, config(checkpoint_path=str(path), checkpoint_every=every), out=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and a_file.read_text() == "not a folder"


def test_a_checkpoint_in_folders_still_to_make_is_taken_and_written(cache, tmp_path):
    path = tmp_path / "new" / "deeper" / "ckpt.pt"
    trainer = Trainer(model(cache), cache, config(checkpoint_path=str(path), max_steps=2), out=None)
    assert not (tmp_path / "new").exists()  # nothing made before the run
    trainer.train()
    assert path.is_file() and trainer.step == 2


@pytest.mark.parametrize("every", [0, 1])
def test_an_empty_checkpoint_path_is_refused(every):
    """TrainConfig(checkpoint_path="", checkpoint_every=1) was taken, and the run wrote no checkpoint without a word
    (the empty path is falsy where the trainer decides to save)."""
    with pytest.raises(ValueError, match="checkpoint_path is empty: name the checkpoint file, or None"):
        config(checkpoint_path="", checkpoint_every=every)


# ---- a diverged step stops the run ---------------------------------------------------------------------------

def test_a_diverging_run_stops_at_the_first_non_finite_step(cache):
    """With learning rate 1e300 the run trained both epochs on NaN (loss nan at every log) and failed only in the
    evaluation ("scores: NaN in 2889 of 2889 events"). Now the first non-finite step raises and names the step, the
    learning rate, and that an earlier update overflowed the parameters (Adam's first step moves each by about
    1e300, past float32's range)."""
    trainer = Trainer(model(cache), cache, config(learning_rate=1e300), out=None)
    with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 0\) diverged at learning rate 1e\+300: loss nan per "
                                                 r"event, gradient norm nan \(the parameters were already non-finite"):
        trainer.train()
    assert trainer.step == 1 and len(trainer.curve) == 1 and trainer.curve[0][1] == trainer.curve[0][1]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_step_is_given_back_unapplied(cache, poison):
    """A step whose loss turns non-finite (here its third, poisoned) raises before the optimizer's step: the
    parameters, the lanes' state and the generator's position are as the step found them, and it is not counted."""
    trainer = Trainer(model(cache), cache, config(), out=None)
    original, seen = trainer.loss_step, {}

    def loss_step(*args):
        loss, loss_sum, state = original(*args)
        if trainer.step == 2:
            seen["parameters"] = [p.detach().clone() for p in trainer.model.parameters()]
            seen["lanes"] = trainer.source.state_cache.state.clone()
            return loss * poison, loss_sum * poison, state
        return loss, loss_sum, state

    trainer.loss_step = loss_step
    with pytest.raises(FloatingPointError, match=r"step 3 \(epoch 0\) diverged at learning rate 0.01: loss "
                                                 rf"{poison:g} per event, gradient norm nan\. This step is not "):
        trainer.train()
    assert trainer.step == 2 and len(trainer.curve) == 2
    assert all(torch.equal(a, b.detach()) for a, b in zip(seen["parameters"], trainer.model.parameters(), strict=True))
    assert torch.equal(seen["lanes"], trainer.source.state_cache.state)
    assert all(p.grad is None for p in trainer.model.parameters())
    # Given back: training on from here runs the same steps as a run that never met the poison.
    trainer.loss_step = original
    trainer.config.max_steps = 5
    trainer.train()
    straight = Trainer(model(cache), cache, config(max_steps=5), out=None).train()
    assert [loss for _, loss in trainer.curve] == [loss for _, loss in straight.curve]


def test_a_finite_run_is_not_stopped_and_clipping_still_applies(cache):
    trainer = Trainer(model(cache), cache, config(max_steps=3, grad_clip=0.5), out=None).train()
    assert trainer.step == 3


# ---- sampled softmax: a drawn item's log_q -----------------------------------------------------------------

def test_log_q_may_be_minus_infinity_at_items_never_drawn():
    """The trainer's proposal gives item 0 (padding) no mass, log_q -inf: that is only wrong for an item drawn."""
    g = torch.Generator().manual_seed(5)
    output = torch.nn.Linear(4, 10)
    log_q = torch.zeros(10)
    log_q[0] = float("-inf")
    loss = sampled_softmax_loss(torch.randn(3, 4, generator=g), torch.tensor([1, 9, 4]), output,
                                torch.tensor([2, 3, 9]), log_q)
    assert torch.isfinite(loss)


# ---- the report in any locale ------------------------------------------------------------------------------

def test_the_report_is_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C (an ASCII locale) a non-ASCII model name failed with UnicodeEncodeError after results.json was
    replaced, leaving report.md of the run before beside it."""
    script = textwrap.dedent(f"""
        import locale, sys, torch
        from hiertcn_fast.evaluate import RankingMetrics
        from hiertcn_fast.report import write_report
        print(locale.getpreferredencoding(False))
        metrics = RankingMetrics()
        metrics.update(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([1]), torch.tensor([0]), torch.tensor([True]))
        write_report({{"HierTCN \\u2014 M\\u00fcller": {{"quality": metrics.result()}}}}, {str(tmp_path)!r},
                     plots=False, title="t\\u00eft\\u00eble")
    """)
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0", PYTHONIOENCODING="utf-8")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip().lower().replace("-", "") == "utf8":
        pytest.skip("this machine gives no ASCII locale (LC_ALL=C is UTF-8 here): the case cannot be set up")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "HierTCN \u2014 M\u00fcller" in report and "t\u00eft\u00eble" in report
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["title"] == "t\u00eft\u00eble" and list(results["models"]) == ["HierTCN \u2014 M\u00fcller"]


# ---- the command line leaves nothing behind on a usage error -----------------------------------------------

def test_a_usage_error_about_out_removes_the_cache_folder_it_made(monkeypatch, tmp_path, capsys):
    """The cache folder was made before --out was found unusable: rc 2, and newcache/ stayed."""
    monkeypatch.setattr(cli, "_train", lambda args: pytest.fail("the job started"))
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    old_cache = tmp_path / "cache"
    (old_cache / "kept").mkdir(parents=True)
    for cache_dir in (tmp_path / "newcache" / "deeper", old_cache):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--cache-dir", str(cache_dir), "--out", str(a_file / "report")])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--out {a_file / 'report'}: cannot create" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cache"]  # newcache/ is gone, cache/ kept
    assert [p.name for p in old_cache.iterdir()] == ["kept"]
