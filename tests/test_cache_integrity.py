"""A cache hit is verified (issue 18 item 3): the record and the size and hash of every file, recorded at publish;
a damaged or foreign entry is rebuilt, never served."""
import json
import re
import shutil
import struct

import torch

from hps_exp import cache, models, stages
from hps_exp.config import OptimConfig
from hps_exp.data.synthetic import load


def _sft(tmp_path):
    spec = stages.SFTSpec(model=stages.ModelSpec(None, 1, 2, 16, 64, 300, 24, 48), enabled=True, targets="all",
                          epochs=1, batch_size=8, seed=0,
                          optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="cosine"))
    train = stages.Examples.of(load(n_train=12, n_test=2, n_responses=2).train)
    env = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "cache")
    return lambda: stages.sft(spec, train, env)


def _weights(result):
    return {k: v.clone() for k, v in models.load_saved(result.path)[1].state_dict().items()}   # not the mmap


def _zero_tensors(path):
    """Zero every tensor byte of a safetensors file: it stays loadable (same header, same size)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = bytes(len(raw) - start)
    path.write_bytes(bytes(raw))


def test_zeroed_or_truncated_weights_are_rebuilt_not_served(tmp_path, capsys):
    sft = _sft(tmp_path)
    first = sft()
    good = _weights(first)
    weights = first.path / "model.safetensors"
    _zero_tensors(weights)
    assert all(not v.any() for v in _weights(first).values() if v.dtype.is_floating_point)  # loads, all zeros
    capsys.readouterr()
    again = sft()
    out = capsys.readouterr().out
    assert re.search(r"\bmodel/model\.safetensors\b.*\bhash\b", out) and "sft: built" in out
    assert all(torch.equal(good[k], v) for k, v in _weights(again).items())

    weights.write_bytes(weights.read_bytes()[:-100])   # truncated
    sft()
    out = capsys.readouterr().out
    assert re.search(r"\bmodel/model\.safetensors\b.*\bbytes\b", out) and "sft: built" in out
    assert all(torch.equal(good[k], v) for k, v in _weights(again).items())


def _json_entry(name, value):
    return cache.stage_entry(name, {"value": value}, {}, {})


def test_a_truncated_file_or_an_entry_copied_from_another_is_rebuilt(tmp_path, capsys):
    built = []

    def build_for(value):
        def build(out):
            built.append(value)
            (out / "eval.json").write_text(json.dumps({"value": value}))
        return build

    a, b = _json_entry("sft_eval", 1), _json_entry("sft_eval", 2)
    path_a, hit = cache.cached(tmp_path, a, build_for(1))
    assert not hit and cache.cached(tmp_path, a, build_for(1)) == (path_a, True)
    (path_a / "eval.json").write_text('{"val')     # truncated
    cache._verified.clear()                        # as a new process would see it
    assert cache.cached(tmp_path, a, build_for(1)) == (path_a, False)
    assert json.loads((path_a / "eval.json").read_text()) == {"value": 1}

    shutil.copytree(path_a, b.path(tmp_path))     # another entry's content under b's name
    path_b, hit = cache.cached(tmp_path, b, build_for(2))
    assert not hit and json.loads((path_b / "eval.json").read_text()) == {"value": 2}
    assert re.search(r"\binputs\.json\b.*\banother\b", capsys.readouterr().out)
    assert built == [1, 1, 2]


def test_large_files_are_verified_by_size_and_sampled_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "FULL_HASH_BYTES", 1 << 20)
    monkeypatch.setattr(cache, "SAMPLE_BYTES", 4096)
    f = tmp_path / "big.bin"
    f.write_bytes(bytes(range(256)) * (3 << 12))   # 3 MiB
    digest = cache.file_digest(f)
    assert digest.startswith("sampled:")
    raw = bytearray(f.read_bytes())
    raw[:4096] = bytes(4096)                       # the first chunk is always sampled
    f.write_bytes(bytes(raw))
    assert cache.file_digest(f) != digest


def test_disk_full_while_building_is_one_line_naming_the_path(tmp_path, monkeypatch):
    import errno

    import pytest

    def full(out):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(cache.CacheError, match=r"\bsft_eval\b.*\bdisk full\b.*\.sft_eval-.*\.tmp-"):
        cache.cached(tmp_path, _json_entry("sft_eval", 1), full)

    def torch_full(out):   # torch's writer says only this when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 4 << 20})())
    with pytest.raises(cache.CacheError, match=r"\bsft_eval\b.*\bdisk full\b.*\b4 MiB\b"):
        cache.cached(tmp_path, _json_entry("sft_eval", 2), torch_full)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]   # no entry, no temp dir


def test_a_killed_policy_save_or_checkpoint_leaves_nothing_after_the_rerun(tmp_path):
    from hps_exp import rundir

    left = [tmp_path / ".policy.tmp-1234", tmp_path / "checkpoints" / ".preference.tmp-h-1-x-step3",
            tmp_path / ".policy.old-99"]
    for p in left:
        p.mkdir(parents=True)
    (tmp_path / "policy").mkdir()
    assert sorted(rundir.clean_partial(tmp_path)) == sorted(left)
    assert [p.name for p in tmp_path.iterdir()] in (["policy", "checkpoints"], ["checkpoints", "policy"])


def test_a_zeroed_or_foreign_reference_entry_is_rebuilt(tmp_path, capsys):
    """The reference stage itself: a ref_logps.pt of zeros that still loads, then another data set's entry copied
    under this one's name; each is reported and rebuilt, never served."""
    sft = _sft(tmp_path)()
    env = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "cache")
    data = load(n_train=12, n_test=6, n_responses=2)
    spec = stages.ReferenceSpec(max_prompt_length=24, max_length=48)
    train, test = stages.Examples.of(data.train), stages.Examples.of(data.test)
    good = stages.reference(spec, sft, train, env)
    entry = tmp_path / "cache" / f"reference-{good.key}"
    torch.save([torch.zeros_like(t) for t in good.logps], entry / "ref_logps.pt")   # loadable, all zeros
    cache._verified.clear()                                                            # as a new process sees it
    capsys.readouterr()
    again = stages.reference(spec, sft, train, env)
    out = capsys.readouterr().out
    assert re.search(r"\bref_logps\.pt\b.*\bhash\b", out) and "reference: built" in out
    assert all(torch.equal(a, b) for a, b in zip(again.logps, good.logps)) and len(again.logps) == len(train)

    other = stages.reference(spec, sft, test, env)
    shutil.rmtree(entry)
    shutil.copytree(tmp_path / "cache" / f"reference-{other.key}", entry)
    cache._verified.clear()
    capsys.readouterr()
    again = stages.reference(spec, sft, train, env)
    assert re.search(r"\binputs\.json\b.*\banother\b", capsys.readouterr().out)
    assert len(again.logps) == len(train) and all(torch.equal(a, b) for a, b in zip(again.logps, good.logps))
